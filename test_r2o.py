"""R2O's specification as tests: each test is one property of the method or of a run.

CPU and small (resnet18, 32-64 px images, a few steps). Run: python -m pytest -q test_r2o.py
"""
import ast
import copy
import errno
import functools
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import traceback
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import data
import eval_cub
import r2o

HERE = Path(__file__).resolve().parent
torch.set_num_threads(1)   # tiny tensors: extra threads only spin, and stall when cores are busy


def tiny_argv(tmp_path, name, *extra):
    """Command line of a tiny synthetic run (a few seconds on CPU) writing to tmp_path/name."""
    return ['--data', 'synthetic', '--synthetic-images', '32', '--image-size', '32',
            '--batch-size', '8', '--epochs', '2', '--superpixels', '12', '--k-max', '8',
            '--hidden-dim', '64', '--out-dim', '32', '--workers', '0', '--kmeans-iters', '5',
            '--device', 'cpu', '--output-dir', str(tmp_path / name),
            '--superpixel-cache', str(tmp_path / 'cache'), *extra]


def free_port():
    """A TCP port free on this machine now, for torchrun (two suites at once must not collide)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tiny_args(tmp_path, name, *extra):
    return r2o.get_args_parser().parse_args(tiny_argv(tmp_path, name, *extra))


def tiny_batch(tmp_path, name, *extra, device='cpu', channels_last=False, on_device=True):
    """The resolved arguments of a tiny run and its first 8 samples as a batch on `device`,
    prepared as the training loop prepares one (on_device=False: as the loader hands it over)."""
    args = r2o.resolve_args(tiny_args(tmp_path, name, *extra))
    dataset = r2o.build_dataset(args)
    batch = data.collate([dataset[(0, i)] for i in range(8)])
    if not on_device:
        return args, batch
    return args, r2o.batch_to_device(batch, torch.device(device), channels_last)


def run_cli(*argv, cwd=HERE, env=None):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def cli_env():
    """The environment of a fresh shell: no torchrun variables, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env['OMP_NUM_THREADS'] = '1'
    return env


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


# ================================ k-means ================================

def test_kmeans_recovers_planted_clusters():
    torch.manual_seed(0)
    centres = torch.randn(5, 16) * 10
    truth = torch.arange(5).repeat_interleave(40)
    x = centres[truth] + torch.randn(200, 16) * 0.3
    labels, centroids = r2o.kmeans(x, 5, iters=20)
    # a perfect clustering up to renaming: every true cluster maps to one found cluster
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 5 and len({b for _, b in pairs}) == 5
    assert torch.isfinite(centroids).all()


def test_kmeans_never_nan_when_clusters_empty():
    # 3 distinct points, 6 clusters: Lloyd steps leave clusters empty; they must be re-seeded
    x = torch.tensor([[0., 0.], [0., 0.], [5., 5.], [5., 5.], [9., 0.], [9., 0.]]).repeat(5, 1)
    labels, centroids = r2o.kmeans(x, 6, iters=10)
    assert torch.isfinite(centroids).all()
    assert labels.min() >= 0 and labels.max() < 6
    # identical points always share a cluster
    assert labels.view(-1, 2).diff(dim=1).abs().sum() == 0


def test_kmeans_of_non_finite_features_gives_finite_centroids_and_valid_labels():
    """A diverged network's NaN or infinite features are clustered as zero rows: no crash, no
    NaN centroid, every label a cluster."""
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    x[3, 1], x[7], x[9, 0] = float('nan'), float('inf'), float('-inf')
    labels, centroids = r2o.kmeans(x, 5, iters=5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(centroids).all() and labels.min() >= 0 and labels.max() < 5


def test_kmeans_ignores_rows_of_weight_zero():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 10
    truth = torch.arange(3).repeat_interleave(30)
    x = centres[truth] + torch.randn(90, 8) * 0.3
    far = torch.full((20, 8), 1000.0)                    # padding rows: would grab a centre
    weight = torch.cat([torch.ones(90), torch.zeros(20)])
    labels, centroids = r2o.kmeans(torch.cat([x, far]), 3, iters=20, weight=weight)
    pairs = set(zip(truth.tolist(), labels[:90].tolist()))
    assert len(pairs) == 3 and len({b for _, b in pairs}) == 3
    for t, c in pairs:
        assert torch.allclose(centroids[c], x[truth == t].mean(0), atol=1e-4)
    assert labels.shape == (110,) and int(labels.max()) < 3


def test_kmeans_deterministic_sums_give_the_same_clusters():
    """deterministic=True sums each cluster by a one-hot matrix product instead of index_add_:
    the same clustering (the sums agree to float rounding), weights included."""
    torch.manual_seed(0)
    x = F.normalize(torch.randn(300, 16), dim=-1)
    weight = (torch.rand(300) > 0.2).float()
    plain = r2o.kmeans(x, 7, 10, torch.Generator().manual_seed(1), weight)
    onehot = r2o.kmeans(x, 7, 10, torch.Generator().manual_seed(1), weight, deterministic=True)
    assert torch.equal(plain[0], onehot[0])
    assert torch.allclose(plain[1], onehot[1], atol=1e-6)


def test_kmeans_draws_its_numbers_on_the_generators_device():
    """The seeding's random numbers come from the generator (on its own device), so the same
    generator seed gives the same clusters, and another seed other seeds."""
    x = F.normalize(torch.randn(200, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    a = r2o.kmeans(x, 12, 5, torch.Generator().manual_seed(3))[0]
    b = r2o.kmeans(x, 12, 5, torch.Generator().manual_seed(3))[0]
    c = r2o.kmeans(x, 12, 5, torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# the seedings kmeans can be given, by name in r2o: each test below holds every one of them
SEEDINGS = ['kmeans_seeds', 'kmeans_seeds_in_rounds']   # the method's, and --kmeans-seeding rounds


def unequal_blobs(generator):
    """200 rows in 4 blobs of 185, 5, 5 and 5 rows (unit spread, 100 apart) and each row's blob."""
    centres = torch.tensor([[0., 0.], [100., 0.], [0., 100.], [100., 100.]])
    truth = torch.arange(4).repeat_interleave(torch.tensor([185, 5, 5, 5]))
    return centres[truth] + torch.randn(200, 2, generator=generator), truth


@pytest.mark.parametrize('seeding', SEEDINGS)
def test_kmeans_seeding_is_d2_a_seed_lands_in_every_blob_however_small(seeding):
    """D^2 seeding draws far rows: on blobs 100 apart, one holding 185 of the 200 rows, a seed
    lands in every blob in nearly every draw (about 39 of 40). Uniform draws almost never manage
    it (185/200 of the rows are in one blob), nor do draws in proportion to D (about 15 of 40)."""
    x, truth = unequal_blobs(torch.Generator().manual_seed(0))
    every_blob = 0
    for trial in range(40):
        seeds = getattr(r2o, seeding)(x, 4, torch.Generator().manual_seed(trial))
        assert seeds.shape == (4, 2)
        blobs = truth[torch.cdist(seeds, x).argmin(1)]
        every_blob += len(blobs.unique()) == 4
    assert every_blob >= 34, f'a seed in every blob in {every_blob} of 40 draws'


@pytest.mark.parametrize('seeding', SEEDINGS)
def test_kmeans_seeding_never_draws_rows_of_weight_zero_unless_too_few_others(seeding):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60, 4, generator=g),
                   1000 + torch.randn(20, 4, generator=g)])     # far: D^2 seeding's favourites
    weight = torch.cat([torch.ones(60), torch.zeros(20)])
    for trial in range(10):
        seeds = getattr(r2o, seeding)(x, 8, torch.Generator().manual_seed(trial), weight)
        assert seeds.shape == (8, 4) and (seeds.abs() < 100).all()
    # fewer than k rows of weight 1: every one of them is a seed, and k centres still come back
    weight = torch.zeros(80)
    weight[[3, 30, 50]] = 1
    for trial in range(10):
        seeds = getattr(r2o, seeding)(x, 5, torch.Generator().manual_seed(trial), weight)
        assert seeds.shape == (5, 4) and torch.isfinite(seeds).all()
        assert torch.cdist(x[[3, 30, 50]], seeds).amin(1).max() == 0


@pytest.mark.parametrize('seeding', SEEDINGS)
def test_kmeans_seeding_ignores_where_rows_of_weight_zero_lie(seeding):
    """Rows of weight 0 count nowhere, not in the totals that pick a candidate either: moving
    them elsewhere leaves the seeds drawn with the same generator unchanged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 2, generator=g)
    weight = torch.cat([torch.ones(60), torch.zeros(40)])
    moved = x.clone()
    moved[60:] = 30 * torch.randn(40, 2, generator=g) + 50
    for trial in range(10):
        seeds = [getattr(r2o, seeding)(rows, 8, torch.Generator().manual_seed(trial), weight)
                 for rows in (x, moved)]
        assert torch.equal(*seeds)


def test_squared_distances_are_exact_for_far_away_rows_and_never_negative():
    """Far from the origin the matrix product loses the small differences to rounding; what
    comes out is still a distance: never below 0, 0 from a row to itself up to rounding."""
    g = torch.Generator().manual_seed(0)
    x = 1000 + torch.randn(50, 16, generator=g)
    d = r2o.squared_distances(x, x)
    assert (d >= 0).all() and torch.allclose(d, torch.cdist(x, x) ** 2, atol=8.0)
    x_sq = (x * x).sum(1, keepdim=True)                     # given by the caller: the same
    assert torch.allclose(r2o.squared_distances(x, x[:5], x_sq), d[:, :5], atol=8.0)


def test_kmeans_restarts_clusters_emptied_at_once_on_the_farthest_rows_one_each():
    """Given centres 0 and 2 far from every row, both clusters are empty after the first
    assignment: the first takes the row farthest from its centroid, the second the next one."""
    x = torch.tensor([[float(i), 0.] for i in range(10)] + [[50., 0.]])
    weight = torch.cat([torch.ones(10), torch.zeros(1)])        # (50, 0): would be the farthest
    start = torch.tensor([[1000., 1000.], [0., 0.], [-1000., 1000.]])
    _, centroids = r2o.kmeans(x, 3, iters=1, weight=weight, seeding=lambda *_: start)
    assert torch.equal(centroids, torch.tensor([[9., 0.], [4.5, 0.], [8., 0.]]))
    labels, centroids = r2o.kmeans(x, 3, iters=5, weight=weight, seeding=lambda *_: start)
    assert sorted(labels[:10].bincount().tolist()) == [2, 3, 5] and torch.isfinite(centroids).all()


@pytest.mark.parametrize('seeding', ['all_on_one_row', 'with_replacement', *SEEDINGS])
def test_kmeans_clusters_end_non_empty_when_there_are_k_distinct_rows(seeding):
    """However the centres start (here even all on one row), no cluster is left empty: 10
    clusters of 12 distinct rows each end with rows of their own."""
    seed = dict(all_on_one_row=lambda x, k, g, w: x[:1].repeat(k, 1),
                with_replacement=lambda x, k, g, w: x[torch.randint(len(x), (k,), generator=g)])
    seed = seed.get(seeding) or getattr(r2o, seeding)
    for trial in range(10):
        x = torch.randn(12, 3, generator=torch.Generator().manual_seed(trial))
        labels, _ = r2o.kmeans(x, 10, 10, torch.Generator().manual_seed(trial), seeding=seed)
        assert len(labels.unique()) == 10


def test_kmeans_seeding_rounds_add_half_as_many_centres_as_there_are():
    assert r2o.seeding_rounds(128) == [1, 1, 1, 2, 3, 4, 6, 9, 14, 21, 31, 34]
    for k in range(1, 200):
        sizes = r2o.seeding_rounds(k)
        assert 1 + sum(sizes) == k and all(s >= 1 for s in sizes)


def test_kmeans_labels_each_row_with_its_nearest_returned_centroid():
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    for iters in (1, 2):                                 # unconverged: the last update moved them
        labels, centroids = r2o.kmeans(x, 6, iters, torch.Generator().manual_seed(0))
        assert torch.equal(labels, torch.cdist(x, centroids).argmin(1))


def test_kmeans_caps_k_at_the_number_of_points():
    labels, centroids = r2o.kmeans(torch.randn(3, 4), 10)
    assert centroids.shape == (3, 4) and sorted(labels.tolist()) == [0, 1, 2]


def test_kmeans_runs_in_fp32_under_autocast():
    x = torch.randn(64, 8, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, centroids = r2o.kmeans(x, 4)
    assert centroids.dtype == torch.float32


# ================================ refinement ================================

def test_superpixel_pool_averages_inside_each_superpixel():
    features = torch.arange(16.).view(1, 1, 4, 4)
    superpixels = torch.zeros(1, 8, 8, dtype=torch.long)
    superpixels[0, :, 4:] = 1                            # right half of the image
    pooled, area = r2o.superpixel_pool(features, superpixels)
    assert pooled[0, 0, 0] == features[0, 0, :, :2].mean()
    assert pooled[0, 1, 0] == features[0, 0, :, 2:].mean()
    assert torch.allclose(area, torch.tensor([[8., 8.]]))


def test_refine_clusters_the_whole_batch_together():
    # two images, each with a left region of "kind A" and a right region of "kind B" features;
    # the same kind must get the same cluster id in both images
    features = torch.zeros(2, 3, 2, 2)
    features[:, 0, :, 0] = 1.0                            # left cells: kind A
    features[:, 1, :, 1] = 1.0                            # right cells: kind B
    superpixels = torch.zeros(2, 8, 8, dtype=torch.long)
    superpixels[:, :, 4:] = 1
    superpixels[1] = 1 - superpixels[1]                   # other superpixel numbering in image 1
    labels = r2o.refine(features, superpixels, k=2)
    assert labels.shape == (2, 8, 8)
    assert (labels[0, :, :4] == labels[1, :, :4]).all() and (labels[0, :, 4:] == labels[1, :, 4:]).all()
    assert labels[0, 0, 0] != labels[0, 0, 7]


def test_refine_leaves_ids_absent_from_an_image_out_of_the_clustering():
    """Absent ids (n_superpixels larger than the ids in use) take no cluster away from the
    present superpixels: two present superpixels of different directions, k=2, two clusters."""
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0] = 1.0
    features[0, :, :, 1] = torch.tensor([0.8, 0.6])[:, None]    # right half: 37 degrees off
    superpixels = torch.zeros(1, 8, 8, dtype=torch.long)
    superpixels[0, :, 4:] = 1
    for trial in range(10):
        labels = r2o.refine(features, superpixels, 2, generator=torch.Generator().manual_seed(trial),
                            n_superpixels=10)                   # ids 2..9 absent
        assert labels[0, 0, 0] != labels[0, 0, 7]


def test_masks_for_batch_without_k_are_the_superpixels_themselves():
    """k None (DetCon-style): one mask per superpixel id, K = the largest id + 1."""
    superpixels = torch.zeros(2, 16, 16, dtype=torch.long)
    superpixels[:, :, 8:] = 1
    superpixels[1, 8:, :] = 2
    boxes = torch.tensor([[0., 0., 1., 1.]]).expand(2, 2, 4)
    flips = torch.zeros(2, 2, dtype=torch.bool)
    m1, m2, K = r2o.masks_for_batch(None, torch.zeros(2, 3, 64, 64), superpixels, boxes, flips, None)
    assert K == 3 and m1.shape == m2.shape == (2, 3, 4)
    assert torch.allclose(m1.sum(1), torch.ones(2, 4)) and torch.equal(m1, m2)
    assert m1[0].tolist() == [[1., 0., 1., 0.], [0., 1., 0., 1.], [0., 0., 0., 0.]]
    # each view is cut with its own box and flipped by its own flag
    boxes = torch.tensor([[[0., 0., 1., 1.], [0.25, 0., 1., 1.]]] * 2)
    flips = torch.tensor([[False, True], [True, False]])
    m1, m2, _ = r2o.masks_for_batch(None, torch.zeros(2, 3, 64, 64), superpixels, boxes, flips, None)
    for view, masks in ((0, m1), (1, m2)):
        assert torch.equal(masks, r2o.view_masks(superpixels, boxes[:, view], flips[:, view], 3, 2))
    assert not torch.equal(m2, r2o.view_masks(superpixels, boxes[:, 1], flips[:, 0], 3, 2))


def same_partition(a, b):
    """Whether two labellings group the same things together (cluster ids may differ)."""
    pairs = set(zip(a.flatten().tolist(), b.flatten().tolist()))
    return len(pairs) == len({p for p, _ in pairs}) == len({q for _, q in pairs})


def test_refine_clusters_superpixels_by_the_direction_of_their_features():
    """Each superpixel's pooled feature is L2-normalised before k-means: scaling the features of
    each superpixel by its own factor changes nothing, while without the normalisation the
    superpixels' magnitudes take over. Two images of 16 superpixels, each a 2 x 2 block of the
    8 x 8 feature map (so each pools exactly its own scaled cells), of two kinds: features along
    e1 or along e2; half of the e1 kind scaled by 100."""
    g = torch.Generator().manual_seed(0)
    kind = torch.randint(0, 2, (2, 16), generator=g)
    kind[:, :2] = torch.tensor([0, 1])                            # both kinds in each image
    ids = torch.stack([torch.randperm(16, generator=g) for _ in range(2)])   # any numbering
    cells = ids.view(2, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)   # B x 8 x 8
    superpixels = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)         # B x 16 x 16
    features = F.one_hot(kind.gather(1, cells.flatten(1)), 4).float().view(2, 8, 8, 4)
    features = (features + 0.05 * torch.rand(2, 8, 8, 4, generator=g)).permute(0, 3, 1, 2)
    scale = torch.where((kind == 0) & (torch.arange(16) % 2 == 0), 100.0, 1.0)  # by superpixel id
    scale = scale * (0.5 + torch.rand(2, 16, generator=g))
    scaled = features * scale.gather(1, cells.flatten(1)).view(2, 1, 8, 8)
    by_kind = kind.gather(1, superpixels.flatten(1)).view_as(superpixels)
    refine = lambda f, **kw: r2o.refine(f, superpixels, 2, 10, torch.Generator().manual_seed(1), **kw)
    assert same_partition(refine(features), by_kind)
    assert same_partition(refine(scaled), by_kind)
    assert not same_partition(refine(scaled, normalize=False), by_kind)


def test_view_masks_cut_the_crop_and_follow_the_flip():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :, 4:] = 1                                 # cluster 1 = right half
    whole = torch.tensor([[0., 0., 1., 1.]])
    left = torch.tensor([[0., 0., 0.5, 1.]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    m = r2o.view_masks(labels, whole, no, 2, 2).view(2, 2, 2)
    assert torch.allclose(m[0], torch.tensor([[1., 0.], [1., 0.]]))
    assert torch.allclose(m[1], torch.tensor([[0., 1.], [0., 1.]]))
    m_left = r2o.view_masks(labels, left, no, 2, 2).view(2, 2, 2)
    assert torch.allclose(m_left[0], torch.ones(2, 2)) and torch.allclose(m_left[1], torch.zeros(2, 2))
    flipped = r2o.view_masks(labels, whole, yes, 2, 2).view(2, 2, 2)
    assert torch.allclose(flipped, m.flip(-1))


def test_view_masks_sum_to_one_over_clusters():
    labels = torch.randint(0, 6, (3, 16, 16))
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0., 0., 1., 1.], [0.5, 0.5, 0.8, 0.6]])
    masks = r2o.view_masks(labels, boxes, torch.tensor([True, False, True]), 6, 4)
    assert torch.allclose(masks.sum(1), torch.ones(3, 16), atol=1e-5)


def test_mask_pool_divides_the_sum_by_the_area_but_never_by_less_than_one_cell():
    features = torch.randn(2, 5, 3, 3)
    masks = torch.rand(2, 4, 9)
    masks[0, 1] = 0                                      # empty: a zero row
    masks[1, 2] = 0
    masks[1, 2, 4] = 0.3                                 # under one cell: summed, not averaged
    sums = torch.einsum('bkn,bcn->bkc', masks, features.flatten(2))
    area = masks.sum(-1, keepdim=True)
    pooled = r2o.mask_pool(features, masks)
    assert torch.allclose(pooled, sums / area.clamp_min(1), atol=1e-5)
    assert torch.equal(pooled[0, 1], torch.zeros(5))
    assert torch.allclose(pooled[1, 2], 0.3 * features[1, :, 1, 1], atol=1e-6)
    average = r2o.mask_pool(features, masks, min_area=1e-6)
    assert torch.allclose(average[1, 2], features[1, :, 1, 1], atol=1e-5)
    assert torch.allclose(average[0, 0], sums[0, 0] / area[0, 0], atol=1e-5)


def test_view_masks_are_the_exact_area_fractions():
    """roi_align with the adaptive sampling ratio and aligned=True: each cell holds the exact
    fraction of it that each cluster covers (here a box that cuts cells of the label map)."""
    M, g = 56, 7
    labels = torch.randint(0, 5, (1, M, M))
    box = torch.tensor([[0.1, 0.25, 0.6, 0.75]])         # 28 x 28 label cells: 4 x 4 per mask cell
    masks = r2o.view_masks(labels, box, torch.tensor([False]), 5, g).view(5, g, g)
    x0 = 0.1 * M                                         # 5.6: mask cells cut label cells
    cols = torch.arange(M, dtype=torch.float32)
    exact = torch.zeros(5, g, g)
    onehot = F.one_hot(labels[0], 5).float()             # M x M x 5
    for j in range(g):                                   # mask cell column j covers [x0 + 4j, x0 + 4j + 4)
        lo, hi = x0 + 4 * j, x0 + 4 * j + 4
        wx = (torch.minimum(cols + 1, torch.tensor(hi)) - torch.maximum(cols, torch.tensor(lo))).clamp(0, 1)
        for i in range(g):
            rows = slice(14 + 4 * i, 18 + 4 * i)
            exact[:, i, j] = (onehot[rows] * wx[None, :, None]).sum((0, 1)) / 16
    assert torch.allclose(masks, exact, atol=0.02)
    assert (masks - exact).abs().mean() < 0.005


# ================================ loss ================================

def small_model(arch='resnet18'):
    torch.manual_seed(0)
    return r2o.build_model(arch, hidden_dim=64, out_dim=32)


def batch_masks(model, batch, k, args, generator=None):
    """masks_for_batch on a loader batch, as the training step calls it."""
    return r2o.masks_for_batch(model.target_encoder, batch['raw'], batch['superpixels'],
                               batch['boxes'], batch['flips'], k, args.kmeans_iters, generator,
                               args.cluster_batch, batch['n_superpixels'])


def test_mask_present_in_one_view_adds_nothing_to_the_loss():
    model = small_model().eval()   # BatchNorm by running statistics: in training mode every row,
    v1, v2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)    # the absent mask's too,
    m1 = torch.zeros(2, 3, 4)                                      # enters the heads' statistics
    m2 = torch.zeros(2, 3, 4)
    m1[:, 0], m2[:, 0] = 0.5, 0.5                        # mask 0: in both views
    m1[:, 1], m2[:, 1] = 0.5, 0.5                        # mask 1: in both views
    m1[:, 2] = torch.tensor([1., 0., 0., 0.])            # mask 2: only in view 1
    assert r2o.mask_overlap(m1, m2).tolist() == [[True, True, False]] * 2
    loss = model(v1, v2, m1, m2)
    m1_changed = m1.clone()
    m1_changed[:, 2] = torch.tensor([0., 0., 0.3, 1.])
    assert torch.allclose(loss, model(v1, v2, m1_changed, m2))
    m1_changed[:, 1] = torch.tensor([0., 0., 0.3, 1.])  # a mask in both views does count
    assert not torch.allclose(loss, model(v1, v2, m1_changed, m2))


def test_mask_loss_values():
    """2 - 2 cos, symmetrised, over the valid pairs only: 0 for aligned rows, 4 for opposite."""
    p = torch.randn(2, 3, 8)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    garbage = p.clone()
    garbage[~valid] = torch.randn(3, 8)                  # rows of invalid pairs: anything
    assert torch.allclose(r2o.mask_loss(p, p, 3 * garbage, 2 * p, valid), torch.tensor(0.), atol=1e-6)
    assert torch.allclose(r2o.mask_loss(p, p, -p, -garbage, valid), torch.tensor(4.), atol=1e-6)
    half = p.clone()
    half[0, 0] = -p[0, 0]                                # one of 3 valid pairs opposite, one way
    assert torch.allclose(r2o.mask_loss(p, p, half, p, valid), torch.tensor(4 / 3 / 2), atol=1e-6)
    # no valid pair at all: 0, not 0/0
    assert r2o.mask_loss(p, p, -p, -p, torch.zeros(2, 3, dtype=torch.bool)) == 0


def test_mask_loss_over_groups_is_the_mean_of_the_groups_losses():
    """groups=2: each half of the batch averaged over its own valid pairs, then the two
    averages averaged, as two GPUs' losses are by DDP; unequal pair counts make it differ from
    one average over all pairs."""
    torch.manual_seed(0)
    p1, p2, z1, z2 = torch.randn(4, 8, 4, 16).unbind()
    valid = torch.zeros(8, 4, dtype=torch.bool)
    valid[:4] = True                                     # first half: 16 pairs
    valid[5, 1] = True                                   # second half: 1 pair
    halves = [r2o.mask_loss(p1[s], p2[s], z1[s], z2[s], valid[s]) for s in (slice(0, 4), slice(4, 8))]
    grouped = r2o.mask_loss(p1, p2, z1, z2, valid, groups=2)
    assert torch.allclose(grouped, (halves[0] + halves[1]) / 2)
    assert not torch.allclose(grouped, r2o.mask_loss(p1, p2, z1, z2, valid), atol=1e-3)


def test_overlap_indicator_is_any_trace_of_the_mask_in_both_views():
    m1 = torch.tensor([[[0.0011, 0, 0, 0], [0.0009, 0, 0, 0], [0.5, 0.5, 0, 0]]])
    m2 = torch.tensor([[[0, 0, 0, 0.002], [0.5, 0, 0, 0], [0, 0, 0, 0]]])
    assert r2o.mask_overlap(m1, m2).tolist() == [[True, False, False]]
    assert r2o.mask_overlap(m1, m2, min_area=0.49 * 4).tolist() == [[False, False, False]]


def test_k1_is_byol():
    """With K=1 every mask is the whole crop, and the loss equals plain BYOL (global pooling)."""
    model = small_model()
    torch.manual_seed(1)
    v1, v2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    labels = torch.zeros(4, 16, 16, dtype=torch.long)
    boxes = torch.rand(4, 2) * 0.4
    boxes = torch.cat([boxes, boxes + 0.5], 1)
    no_flip = torch.zeros(4, dtype=torch.bool)
    m1 = r2o.view_masks(labels, boxes, no_flip, 1, 2)
    m2 = r2o.view_masks(labels, boxes.flip(0), no_flip, 1, 2)
    loss = model(v1, v2, m1, m2)

    # plain BYOL, written independently: torchvision's forward (global average pool)
    def cos_loss(p, z):
        return (2 - 2 * F.cosine_similarity(p, z, dim=-1)).mean()
    x = torch.cat([v1, v2])
    p1, p2 = model.predictor(model.projector(model.encoder(x))).chunk(2)
    with torch.no_grad():
        z1, z2 = model.target_projector(model.target_encoder(x)).chunk(2)
    byol = (cos_loss(p1, z2) + cos_loss(p2, z1)) / 2     # the reference's scale
    assert r2o.mask_overlap(m1, m2).sum() == 4
    assert torch.allclose(loss, byol, atol=1e-5)


def resnet_layer4(net, x):
    """A torchvision ResNet's last feature map (its forward without avgpool and fc)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def reference_style_loss(model, v1, v2, m1, m2):
    """R2O's loss as the reference computes it, written out separately from r2o.R2O: every one
    of the 2B x K pooled rows (empty masks as zero rows) through projector and predictor, pooling
    as sum / max(area, 1) in cells, the pairs with area > 1e-3 in both views, (L12 + L21) / 2."""
    B, K = m1.shape[:2]

    def heads(encoder, projector, predictor=None):
        f = resnet_layer4(encoder, torch.cat([v1, v2]))                        # 2B x C x g x g
        m = torch.cat([m1, m2])                                                 # 2B x K x g^2
        rows = torch.einsum('bkn,bcn->bkc', m, f.flatten(2)) / m.sum(-1, keepdim=True).clamp(min=1)
        out = projector(rows.reshape(2 * B * K, -1))
        return (predictor(out) if predictor else out).reshape(2, B, K, -1)

    p = heads(model.encoder, model.projector, model.predictor)
    with torch.no_grad():
        z = heads(model.target_encoder, model.target_projector)
    valid = ((m1.sum(-1) > 1e-3) & (m2.sum(-1) > 1e-3)).float()
    l12 = ((2 - 2 * F.cosine_similarity(p[0], z[1], dim=-1)) * valid).sum() / valid.sum()
    l21 = ((2 - 2 * F.cosine_similarity(p[1], z[0], dim=-1)) * valid).sum() / valid.sum()
    return (l12 + l21) / 2


@pytest.mark.parametrize('merge', [False, True], ids=['all-rows', 'empty-rows-merged'])
def test_default_step_computes_the_reference_loss_and_gradients(tmp_path, merge):
    """Both ways of computing the default step (every row through the heads, as on a GPU; the
    empty rows computed once and counted, as on a CPU) give the reference's loss, gradients
    and BatchNorm running statistics. At 96 px the final map is 3 x 3, so an error in where a
    mask's cells are pooled from would change the loss."""
    args, batch = tiny_batch(tmp_path, 'ref', '--image-size', '96')
    torch.manual_seed(0)
    model = r2o.build_model(args.arch, args.hidden_dim, args.out_dim, merge_empty_rows=merge)
    g = torch.Generator().manual_seed(0)
    m1, m2, k = batch_masks(model, batch, 6, args, g)
    m1[0, :] = 0
    m1[0, 0] = 1                                          # image 0: one mask covers view 1
    assert k == 6 and m1.shape == (8, 6, 9) and (m1.sum(-1) == 0).any()   # empty rows
    assert ((m1.sum(-1) > 0) & (m1.sum(-1) < 1)).any()   # and some smaller than one cell
    assert ((m1 > 0) & (m1 < 1)).any()                   # cells shared by two masks
    reference = copy.deepcopy(model)
    ours = model(batch['view1'], batch['view2'], m1, m2)
    ours_grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])
    theirs = reference_style_loss(reference, batch['view1'], batch['view2'], m1, m2)
    their_grads = torch.autograd.grad(theirs, [p for p in reference.parameters() if p.requires_grad])
    assert torch.allclose(ours, theirs, atol=1e-5)
    for a, b in zip(ours_grads, their_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4), name


def test_mlp_with_counts_is_the_mlp_on_the_repeated_rows():
    torch.manual_seed(0)
    head = r2o.mlp(6, 16, 4)
    x = torch.randn(5, 6, requires_grad=True)
    counts = torch.tensor([1., 3., 1., 7., 2.])
    repeated = copy.deepcopy(head)
    out = r2o.mlp_with_counts(head, x, counts)
    expected = repeated(x.repeat_interleave(counts.long(), 0))
    assert torch.allclose(out.repeat_interleave(counts.long(), 0), expected, atol=1e-5)
    weights = torch.randn(5, 4)            # any loss of the outputs, each row counted its times
    (grad,) = torch.autograd.grad((out * weights * counts[:, None]).sum(), x)
    (expected_grad,) = torch.autograd.grad(
        (expected * weights.repeat_interleave(counts.long(), 0)).sum(), x)
    assert torch.allclose(grad, expected_grad, atol=1e-5)
    assert torch.allclose(head[1].running_var, repeated[1].running_var, atol=1e-6)
    assert torch.allclose(head[1].running_mean, repeated[1].running_mean, atol=1e-6)
    head.eval(), repeated.eval()
    assert torch.allclose(r2o.mlp_with_counts(head, x, counts), repeated(x), atol=1e-5)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(head)   # statistics of all GPUs
    with pytest.raises(ValueError, match='this process only'):
        r2o.mlp_with_counts(synced, x, counts)


# ================================ schedules ================================

def test_k_schedule_cosine_matches_the_reference_and_shrinks():
    ks = [r2o.k_schedule(e, 300) for e in range(1, 301)]
    assert {e: ks[e - 1] for e in (50, 150, 200, 250, 290, 300)} == \
        {50: 123, 150: 91, 200: 66, 250: 36, 290: 10, 300: 4}
    assert all(a >= b for a, b in zip(ks, ks[1:]))
    assert min(ks[:60]) > 120                           # above 120 for the first fifth
    assert ks[0] == 127


def test_other_k_schedules():
    assert r2o.k_schedule(1, 10, 'constant', 1) == 1
    assert r2o.k_schedule(5, 10, 'none') is None
    lin = [r2o.k_schedule(e, 10, 'linear', 40, 4) for e in range(1, 11)]
    assert lin[-1] == 4 and all(a > b for a, b in zip(lin, lin[1:]))
    # 6.67 and 5.33 round to the nearest
    assert [r2o.k_schedule(e, 3, 'linear', 8, 4) for e in (1, 2, 3)] == [7, 5, 4]


def test_learning_rate_and_momentum_schedules():
    assert r2o.learning_rate(0, 100, 10, 0.3) == 0
    assert r2o.learning_rate(10, 100, 10, 0.3) == pytest.approx(0.3)
    assert r2o.learning_rate(100, 100, 10, 0.3) == pytest.approx(0, abs=1e-12)
    assert r2o.learning_rate(55, 100, 10, 0.3) == pytest.approx(0.15)
    assert r2o.ema_momentum(0, 100) == pytest.approx(0.99)
    assert r2o.ema_momentum(100, 100) == pytest.approx(1.0)
    assert r2o.ema_momentum(50, 100) == pytest.approx(0.995)
    # batch scaling and the K/16 factor, in the one function
    assert r2o.learning_rate(10, 100, 10, 0.3, global_batch=4096) == pytest.approx(4.8)
    assert r2o.learning_rate(10, 100, 10, 0.3, global_batch=512, k=32) == pytest.approx(1.2)
    assert r2o.learning_rate(5, 100, 10, 0.3, global_batch=512, k=8) == pytest.approx(0.15)


def test_ema_keeps_the_papers_horizon_in_images_at_any_global_batch():
    """0.99 per step at the paper's global batch of 4096, 0.99^(B/4096) at B: the same decay
    per image, so the product over one epoch's steps is the same at every batch."""
    assert r2o.ema_momentum(0, 1000, 0.99, 4096 / 4096) == 0.99
    assert r2o.ema_momentum(0, 1000, 0.99, 256 / 4096) == pytest.approx(0.99 ** (1 / 16), abs=1e-15)
    assert r2o.ema_momentum(0, 1000, 0.99, 256 / 4096) == pytest.approx(0.99937, abs=1e-5)
    images = 4096 * 313                      # about an ImageNet epoch, a multiple of each batch
    epoch_decay = [r2o.ema_momentum(0, 1000, 0.99, b / 4096) ** (images // b)
                   for b in (32, 256, 1024, 4096)]
    assert epoch_decay == pytest.approx([0.99 ** (images / 4096)] * 4, rel=1e-9)
    assert r2o.ema_momentum(1000, 1000, 0.99, 256 / 4096) == pytest.approx(1.0)   # -> 1


def test_ema_scaling_follows_the_run_and_the_demo_keeps_its_momentum(tmp_path):
    """A dataset run scales --ema to its global batch; the demo preset keeps 0.99 per step."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    for i in range(8):
        Image.fromarray(data.synthetic_scene(i, 48)[0]).save(folder / f'{i}.jpg')
    demo = r2o.resolve_args(tiny_args(tmp_path, 'demo'))
    photos = r2o.resolve_args(tiny_args(tmp_path, 'photos', '--data', str(folder)))
    off = r2o.resolve_args(tiny_args(tmp_path, 'off', '--data', str(folder), '--no-ema-batch-scale'))
    device = torch.device('cpu')
    ratio = {name: r2o.run_constants(a, 0, 1, device, 10)['ema_batch_ratio']
             for name, a in (('demo', demo), ('photos', photos), ('off', off))}
    assert ratio == dict(demo=1.0, photos=8 / 4096, off=1.0)
    run = r2o.run_constants(photos, 0, 2, device, 10)             # two processes: global 16
    lines = '\n'.join(r2o.startup_lines(photos, run, 8, 10, device))
    assert 'global batch 4096' in lines and 'global batch   16' in lines
    assert f'{0.99 ** (16 / 4096):.5f}' in lines
    assert '--batch-size 512 --cluster-batch 32' in lines and '--batch-size 256 --cluster-batch 32' in lines


# ================================ optimizer ================================

def test_lars_excludes_biases_and_all_batchnorm():
    model = small_model()
    regular, excluded = r2o.lars_param_groups(model)
    ids = lambda ps: {id(p) for p in ps}
    bn = [p for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
          for p in m.parameters(recurse=False) if p.requires_grad]
    biases = [p for n, p in model.named_parameters() if n.endswith('bias') and p.requires_grad]
    assert ids(bn) | ids(biases) == ids(excluded['params'])
    assert model.encoder.bn1.weight in excluded['params']             # the stem BN too
    assert excluded['weight_decay'] == 0 and excluded['lars_exclude']
    assert all(p.dim() > 1 for p in regular['params'])
    online = {id(p) for p in model.parameters() if p.requires_grad}
    assert ids(regular['params']) | ids(excluded['params']) == online   # no target weights


@pytest.mark.parametrize('lars', ['LARS', 'LARSForeach'])
def test_lars_is_the_reference_update_through_an_lr_change(lars):
    """buf = 0.9 buf + lr * trust * (g + wd w), trust = 0.001 |w| / (|g| + wd |w|), w -= buf;
    biases: buf = 0.9 buf + lr * g. Written out by hand over steps whose lr changes."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    opt = getattr(r2o, lars)([dict(params=[w]), dict(params=[b], weight_decay=0.0, lars_exclude=True)],
                   weight_decay=1e-2)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    buf_w, buf_b = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for lr in (0.1, 0.4, 0.4, 2.0, 0.05):               # warmup, then the K/16 jump, then decay
        grad_w, grad_b = torch.randn(4, 3), torch.randn(4)
        w.grad, b.grad = grad_w.clone(), grad_b.clone()
        for group in opt.param_groups:
            group['lr'] = lr
        opt.step()
        trust = 0.001 * w_ref.norm() / (grad_w.norm() + 1e-2 * w_ref.norm())
        buf_w = 0.9 * buf_w + lr * trust * (grad_w + 1e-2 * w_ref)
        buf_b = 0.9 * buf_b + lr * grad_b
        w_ref, b_ref = w_ref - buf_w, b_ref - buf_b
        assert torch.allclose(w, w_ref, atol=1e-6) and torch.allclose(b, b_ref, atol=1e-6)


@pytest.mark.parametrize('lars', ['LARS', 'LARSForeach'])
def test_lars_trust_ratio_is_per_tensor_and_zero_norms_are_the_references(lars):
    """A group of several tensors: each takes its own trust ratio. A zero weight takes trust 1
    (the reference's); a zero gradient takes 0.001 / weight_decay, as the formula gives (the
    reference's too); a zero gradient without weight decay moves nothing and makes no NaN."""
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 3), (3, 3), (6,)]
    params = [torch.nn.Parameter(torch.randn(s) * (i + 1)) for i, s in enumerate(shapes)]
    with torch.no_grad():
        params[3].zero_()                                  # a zero weight
    grads = [torch.randn(s) * 10 ** -i for i, s in enumerate(shapes)]
    grads[4] = torch.zeros(6)                              # a zero gradient
    wd, lr = 1e-2, 0.7
    opt = getattr(r2o, lars)([dict(params=params)], lr=lr, weight_decay=wd)
    before = [p.detach().clone() for p in params]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    opt.step()
    for w, gr, p in zip(before, grads, params):
        if w.norm() == 0:
            trust = 1.0
        else:
            trust = 0.001 * w.norm() / (gr.norm() + wd * w.norm())
        assert torch.allclose(p, w - lr * trust * (gr + wd * w), atol=1e-7, rtol=1e-6)
    assert torch.allclose(params[4], before[4] * (1 - lr * 0.001))   # trust 0.001 / wd = 0.1
    bare = torch.nn.Parameter(torch.randn(3, 3))
    opt = getattr(r2o, lars)([dict(params=[bare])], lr=lr, weight_decay=0.0)
    start = bare.detach().clone()
    bare.grad = torch.zeros(3, 3)
    opt.step()
    assert torch.equal(bare, start)


@pytest.mark.parametrize('lars', ['LARS', 'LARSForeach'])
def test_lars_step_applies_the_trust_ratio_only_to_weights(lars):
    w = torch.nn.Parameter(torch.full((3, 3), 2.0))
    b = torch.nn.Parameter(torch.full((3,), 2.0))
    opt = getattr(r2o, lars)([dict(params=[w]), dict(params=[b], weight_decay=0.0, lars_exclude=True)],
                   lr=0.5, weight_decay=0.1, trust_coefficient=0.001)
    w.grad, b.grad = torch.ones(3, 3), torch.ones(3)
    opt.step()
    update = torch.ones(3, 3) + 0.1 * 2.0
    w_norm = torch.norm(torch.full((3, 3), 2.0))
    trust = 0.001 * w_norm / (torch.norm(torch.ones(3, 3)) + 0.1 * w_norm)
    assert torch.allclose(w, 2.0 - 0.5 * trust * update)
    assert torch.allclose(b, torch.full((3,), 2.0 - 0.5))              # plain SGD step




def test_the_speed_sections_lars_and_ema_compute_the_plain_ones():
    """LARSForeach and ema_update_foreach (the training script's) give LARS's and ema_update's
    numbers to float rounding, over steps with lr changes, a zero weight and a zero gradient,
    in both kinds of group."""
    def make():
        torch.manual_seed(0)
        model = r2o.build_model('resnet18', 16, 8)
        with torch.no_grad():
            model.encoder.layer1[0].conv1.weight.zero_()           # a zero weight
        return model
    plain, fast = make(), make()
    opt_plain = r2o.LARS(r2o.lars_param_groups(plain), weight_decay=1e-2)
    opt_fast = r2o.LARSForeach(r2o.lars_param_groups(fast), weight_decay=1e-2)
    g = torch.Generator().manual_seed(1)
    for lr, momentum in ((0.1, 0.9), (0.4, 0.99), (2.0, 0.95), (0.05, 0.999)):
        grads = [torch.randn(p.shape, generator=g) for p in plain.parameters() if p.requires_grad]
        grads[3] = torch.zeros_like(grads[3])                       # a zero gradient
        for model, opt, ema in ((plain, opt_plain, r2o.ema_update),
                                (fast, opt_fast, r2o.ema_update_foreach)):
            for p, gr in zip([p for p in model.parameters() if p.requires_grad], grads):
                p.grad = gr.clone()
            for group in opt.param_groups:
                group['lr'] = lr
            opt.step()
            ema(model, momentum)
    for a, b in zip(plain.state_dict().values(), fast.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7)
    moved = [not torch.equal(a, b) for a, b in zip(make().parameters(), plain.parameters())]
    assert all(moved[:3]) and any(moved[-4:])        # the online and target weights both moved


@pytest.mark.parametrize('seed_base', [0, 1000])
def test_seeding_in_rounds_is_within_its_stated_margin_of_greedy_k_means_plus_plus(seed_base):
    """--kmeans-seeding rounds against the method's greedy k-means++: the inertia after the
    same Lloyd steps, averaged over 8 seeds, is within 2% on unstructured rows (as on real
    photos' features) and higher on well-separated planted clusters (what its docstring says)."""
    def mean_inertia(x, k, seeding):
        total = 0.0
        for s in range(8):
            labels, centroids = r2o.kmeans(x, k, 10, torch.Generator().manual_seed(seed_base + s),
                                           seeding=seeding)
            total += ((x - centroids[labels]) ** 2).sum().item()
        return total / 8
    g = torch.Generator().manual_seed(7)
    unstructured = F.normalize(torch.randn(400, 16, generator=g), dim=1)
    for k in (24, 4):
        rounds = mean_inertia(unstructured, k, r2o.kmeans_seeds_in_rounds)
        assert rounds <= 1.02 * mean_inertia(unstructured, k, r2o.kmeans_seeds)
    centres = torch.randn(32, 16, generator=g)
    planted = F.normalize(centres[torch.randint(32, (480,), generator=g)]
                          + 0.3 * torch.randn(480, 16, generator=g), dim=1)
    assert mean_inertia(planted, 32, r2o.kmeans_seeds_in_rounds) > 1.1 * mean_inertia(planted, 32, r2o.kmeans_seeds)


def test_method_functions_refuse_what_they_would_get_wrong_and_take_any_integer_ids():
    """Ids of any integer dtype work where they are one-hot encoded; a superpixel map that is
    not a multiple of the feature map, an unknown layer name and a batch that does not split
    into `groups` are clear errors instead of silent wrong numbers or a crash deep inside."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 4, 4, generator=g)
    ids = torch.randint(0, 7, (2, 16, 16), generator=g)
    pooled, area = r2o.superpixel_pool(features, ids)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        p, a = r2o.superpixel_pool(features, ids.to(dtype))
        assert torch.equal(p, pooled) and torch.equal(a, area)
        boxes, flips = torch.tensor([[0.1, 0.2, 0.7, 0.9]] * 2), torch.tensor([True, False])
        assert torch.equal(r2o.view_masks(ids.to(dtype), boxes, flips, 7, 2),
                           r2o.view_masks(ids, boxes, flips, 7, 2))
        assert torch.equal(r2o.refine(features, ids.to(dtype), 3, 5, torch.Generator().manual_seed(1)),
                           r2o.refine(features, ids, 3, 5, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match='multiple'):
        r2o.superpixel_pool(features, ids[:, :14, :14])             # 14 vs 4
    net = r2o.build_encoder('resnet18').eval()
    with pytest.raises(ValueError, match="'layer5'"):
        r2o.encoder_features(net, torch.zeros(1, 3, 64, 64), 'layer5')
    p = torch.randn(4, 3, 8, generator=g)
    with pytest.raises(ValueError, match='groups=3'):
        r2o.mask_loss(p, p, p, p, torch.ones(4, 3, dtype=torch.bool), groups=3)


# ================================ a training step ================================

def test_one_step_changes_online_weights_and_ema_moves_target(tmp_path):
    args, batch = tiny_batch(tmp_path, 'step')
    model = small_model()
    opt = r2o.LARS(r2o.lars_param_groups(model))
    for g in opt.param_groups:
        g['lr'] = 0.5
    online0 = [p.detach().clone() for p in model.encoder.parameters()]
    target0 = [p.detach().clone() for p in model.target_encoder.parameters()]
    masks1, masks2, k = batch_masks(model, batch, 4, args)
    assert masks1.shape == (8, 4, 1) and k == 4
    loss = model(batch['view1'], batch['view2'], masks1, masks2)
    loss.backward()
    opt.step()
    bn_target0 = model.target_encoder.bn1.running_mean.clone()
    r2o.ema_update(model, 0.9)
    assert torch.equal(model.target_encoder.bn1.running_mean, bn_target0)   # parameters only
    online1 = list(model.encoder.parameters())
    target1 = list(model.target_encoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(online0, online1))
    for t0, o1, t1 in zip(target0, online1, target1):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * o1.detach())
    assert all(p.grad is None for p in model.target_encoder.parameters())


# ================================ data ================================

def test_synthetic_scenes_are_deterministic():
    a, ia = data.synthetic_scene(3, 64)
    b, ib = data.synthetic_scene(3, 64)
    c, _ = data.synthetic_scene(4, 64)
    assert np.array_equal(a, b) and np.array_equal(ia, ib) and not np.array_equal(a, c)
    assert 1 <= ia.max() <= 4 and a.shape == (64, 64, 3) and a.dtype == np.uint8
    images, masks = data.synthetic_objects(3, 64)
    assert images.shape == (3, 64, 64, 3) and masks.dtype == bool
    assert all(0.02 < m.mean() < 0.9 for m in masks)


def test_downsample_labels_takes_the_majority():
    labels = np.zeros((8, 8), np.int64)
    labels[:, 4:] = 7                                    # right half: label 7
    labels[0, 3] = 7                                     # one stray pixel in cell (0, 1)
    labels[0:2, 0:2] = 9                                 # cell (0, 0) entirely label 9
    expected = np.array([[9, 0, 7, 7]] + [[0, 0, 7, 7]] * 3)
    # ids renumbered 0..n-1 in sorted order: 0 -> 0, 7 -> 1, 9 -> 2
    assert np.array_equal(r2o.downsample_labels(labels, 4), np.searchsorted([0, 7, 9], expected))
    wide = np.zeros((6, 12), np.int64)                   # not square: cells 3 x 6 pixels
    wide[:, 6:] = 5
    wide[:3, 4:6] = 3                                    # a third of cell (0, 0): outvoted
    assert r2o.downsample_labels(wide, 2).tolist() == [[0, 1], [0, 1]]    # 3 gone, 5 -> 1


def test_superpixel_map_is_slic_with_the_given_settings_at_the_masks_resolution():
    from skimage.segmentation import slic
    image = data.synthetic_scene(0, 64)[0]
    for n, compactness, sigma in ((20, 10.0, 0.0), (30, 30.0, 1.0)):
        labels = slic(image, n_segments=n, compactness=compactness, sigma=sigma, start_label=0,
                      channel_axis=-1)
        ours = r2o.superpixel_map(image, n, 16, compactness, sigma)
        assert ours.shape == (16, 16) and np.array_equal(ours, r2o.downsample_labels(labels, 16))


def test_sample_has_the_documented_shapes():
    ds = data.SyntheticDataset(n_images=4, scene_size=96, image_size=64, n_segments=20,
                               superpixel_map=r2o.superpixel_map)
    s = ds[(0, 1)]
    assert s['view1'].shape == s['view2'].shape == s['raw'].shape == (3, 64, 64)
    assert s['superpixels'].shape == (16, 16) and s['superpixels'].dtype == torch.int64
    assert s['boxes'].shape == (2, 4) and s['flips'].shape == (2,)
    x0, y0, x1, y1 = s['boxes'].T
    assert ((0 <= x0) & (x0 < x1) & (x1 <= 1) & (0 <= y0) & (y0 < y1) & (y1 <= 1)).all()
    assert torch.equal(ds[(0, 1)]['view1'], s['view1'])                  # seeded per sample
    assert not torch.equal(ds[(1, 1)]['view1'], s['view1'])              # ...and per epoch


def test_random_crop_box_draws_inside_the_image_over_the_scale_and_log_ratio_ranges():
    """RandomResizedCrop's box: inside the image, area a fraction in `scale` of the image's,
    aspect w/h log-uniform in `ratio` (as many boxes wider than tall as taller than wide)."""
    rng = random.Random(0)
    for width, height in ((300, 100), (100, 300)):             # large boxes do not fit either way
        for _ in range(300):
            left, top, w, h = data.random_crop_box(rng, width, height)
            assert 0 <= left and left + w <= width and 0 < w and 0 <= top and top + h <= height and 0 < h
    boxes = [data.random_crop_box(rng, 1000, 800, scale=(0.1, 0.3)) for _ in range(2000)]
    left, top, w, h = map(np.array, zip(*boxes))
    area, aspect = w * h / (1000 * 800), w / h
    assert area.min() > 0.099 and area.max() < 0.301 and abs(area.mean() - 0.2) < 0.01
    assert aspect.min() < 0.76 and aspect.max() > 1.32 and (aspect > 3 / 4 - 0.01).all() \
        and (aspect < 4 / 3 + 0.01).all()
    assert abs((aspect > 1).mean() - 0.5) < 0.04                  # log-uniform: symmetric in log
    assert (left + w).max() > 990 and (top + h).max() > 790 and left.min() < 10 and top.min() < 10


def test_random_crop_box_falls_back_to_the_central_crop_with_the_ratio_clamped():
    """No box fits a 10 x 1000 image: torchvision's fallback, centred, w/h clamped to 3/4..4/3."""
    assert data.random_crop_box(random.Random(0), 10, 1000) == (0, (1000 - 13) // 2, 10, 13)
    assert data.random_crop_box(random.Random(0), 1000, 10) == ((1000 - 13) // 2, 0, 13, 10)


@pytest.mark.parametrize('resample', data.RESAMPLE)
def test_two_views_show_their_boxes_flips_and_the_asymmetric_augmentations(monkeypatch, resample):
    """Each view is the image inside its box (normalised x0, y0, x1, y1), mirrored when its
    flip is True; view 1 is always blurred and never solarised, view 2 blurred with p=0.1 and
    solarised with p=0.2; `scale` bounds the boxes' areas. The same with the image resampled
    by torch (its tensor) and by Pillow (the PIL image)."""
    calls = []

    def plain(view, rng, blur_p, solarize_p, **kw):        # no colour change: the view shows the crop
        calls.append((blur_p, solarize_p))
        return view
    monkeypatch.setattr(data, 'color_augment', plain)
    width, height = 240, 120
    ramp = np.zeros((height, width, 3), np.uint8)           # red grows along x, green along y
    ramp[..., 0] = np.linspace(0, 255, width)[None, :]
    ramp[..., 1] = np.linspace(0, 255, height)[:, None]
    img = data.pixels_of(Image.fromarray(ramp), resample)
    rng = random.Random(0)
    for flip_p in (0.0, 1.0, 0.5):
        for _ in range(10):
            views, boxes, flips, _ = data.two_views(img, 32, rng, flip_p=flip_p, scale=(0.3, 0.6))
            assert flips.tolist() == [bool(flip_p)] * 2 or flip_p == 0.5
            for view, (x0, y0, x1, y1), flip in zip(views, boxes.tolist(), flips.tolist()):
                rgb = data.denormalize(view).astype(float)
                assert abs(rgb[..., 0].mean() - 255 * (x0 + x1) / 2) < 4      # the box's place
                assert abs(rgb[..., 1].mean() - 255 * (y0 + y1) / 2) < 4
                assert 0.29 < (x1 - x0) * (y1 - y0) < 0.61                     # scale
                rising = rgb[:, -1, 0].mean() > rgb[:, 0, 0].mean()
                assert rising != flip                                          # mirrored iff flip
    assert set(calls) == {(1.0, 0.0), (0.1, 0.2)} and calls[0::2] == [(1.0, 0.0)] * (len(calls) // 2)
    # on_device: the same crops and flips as uint8, and the asymmetric pair in the parameters
    monkeypatch.undo()                                    # the real colour augmentation's draws
    params = []
    for i in range(200):
        views, boxes, flips, p = data.two_views(img, 32, random.Random(i), scale=(0.3, 0.6),
                                                on_device=True)
        ref_views, ref_boxes, ref_flips, _ = data.two_views(img, 32, random.Random(i),
                                                            scale=(0.3, 0.6))
        assert torch.equal(boxes, ref_boxes) and torch.equal(flips, ref_flips)
        assert views[0].dtype == torch.uint8 and views[0].shape == (3, 32, 32)
        params.append(p)
    params = torch.stack(params)                                        # 200 x 2 x PARAMS
    assert params[:, 0, 10].all() and not params[:, 0, 12].any()        # view 1: blur, no solarize
    assert 0.03 < params[:, 1, 10].float().mean() < 0.2 and 0.1 < params[:, 1, 12].float().mean() < 0.3


def pillow_in_two_passes(img, box, size):
    """Pillow's bicubic resize of a box as Pillow before 13 always ran it and the reference's
    pipeline ran on it: the horizontal pass, then the vertical pass, each rounded to 8 bits.
    (Pillow 13 runs the vertical pass first when it judges it cheaper.)"""
    left, top, w, h = box
    crop = img.crop((left, top, left + w, top + h))
    out = crop.resize((size, h), Image.BICUBIC).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def test_torch_resampling_is_pillows_two_passes_to_a_grey_level():
    """resized_crop on an image's tensor (torch's uint8 kernel, --resample torch) computes
    Pillow's bicubic, antialiased two-pass resize of the box: all values within 2 grey levels,
    at most 1.5% of them off at all, and under 0.02% by 2. Boxes of every kind: upscaled and
    downscaled on either axis, touching the edges, from tiny and large, wide and tall images,
    on noise (the hardest: every pixel an edge) and on generated scenes."""
    rng = random.Random(0)
    worst, off, off_by_2 = 0, [], []
    sizes = [(64, 64), (500, 375), (37, 90), (400, 400), (333, 500), (23, 11)]
    for i in range(120):
        width, height = sizes[i % len(sizes)]
        if i % 2:
            img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (height, width, 3),
                                                                    dtype=np.uint8))
        else:
            img = Image.fromarray(data.synthetic_scene(i, max(width, height))[0]).resize((width, height))
        box = data.random_crop_box(rng, width, height) if i % 7 else (0, 0, width, height)
        size = (224, 64, 96)[i % 3]
        ours = data.resized_crop(data.pixels_of(img, 'torch'), box, size)
        assert ours.dtype == torch.uint8 and ours.shape == (3, size, size) and ours.is_contiguous()
        diff = (ours.int() - pillow_in_two_passes(img, box, size).int()).abs()
        worst = max(worst, diff.max().item())
        off.append((diff > 0).float().mean().item())
        off_by_2.append((diff > 1).float().mean().item())
        # --resample pillow: the box cut out, then Pillow's resize (torchvision's RandomResizedCrop)
        pillow = data.resized_crop(data.pixels_of(img, 'pillow'), box, size)
        left, top, w, h = box
        expected = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
        assert torch.equal(pillow, torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    assert worst <= 2 and max(off) <= 0.015 and max(off_by_2) <= 2e-4, (worst, max(off), max(off_by_2))
    assert np.mean(off) > 0                            # not the same code: two kernels that agree


def test_the_dataset_resamples_as_asked(tmp_path):
    """--resample pillow gives a sample Pillow's views and raw view, --resample torch (the
    default) torch's, with the same boxes, flips and colour parameters either way."""
    common = dict(n_images=3, scene_size=90, image_size=48, n_segments=10,
                  superpixel_map=r2o.superpixel_map)
    assert inspect.signature(data.R2ODataset).parameters['resample'].default == 'torch'
    datasets = {r: data.SyntheticDataset(resample=r, **common) for r in data.RESAMPLE}
    for i in range(3):
        img = datasets['torch'].load(i)
        samples = {r: d[(5, i)] for r, d in datasets.items()}
        for key in ('boxes', 'flips', 'photometric', 'superpixels'):
            assert torch.equal(samples['torch'][key], samples['pillow'][key]), key
        for r, sample in samples.items():
            raw = data.resized_crop(data.pixels_of(img, r), (0, 0) + img.size, 48)
            assert torch.equal(sample['raw'], raw), r
            for v, (x0, y0, x1, y1), flip in zip(('view1', 'view2'), sample['boxes'].tolist(),
                                                 sample['flips'].tolist()):
                box = tuple(round(a * b) for a, b in zip((x0, y0, x1 - x0, y1 - y0), img.size * 2))
                view = data.resized_crop(data.pixels_of(img, r), box, 48)
                assert torch.equal(sample[v], view.flip(-1) if flip else view), (r, v)
    with pytest.raises(ValueError, match='resample'):
        data.SyntheticDataset(resample='nearest', **common)


def blur_test_images():
    """Sharp edges everywhere: shapes on textures, noise (not square), a grey checkerboard."""
    noise = np.random.default_rng(0).integers(0, 256, (37, 58, 3), dtype=np.uint8)
    checks = (np.indices((48, 30)).sum(0) // 5 % 2 * 255).astype(np.uint8)
    return [Image.fromarray(data.synthetic_scene(0, 64)[0]), Image.fromarray(noise),
            Image.fromarray(checks).convert('RGB')]


def test_blur_is_the_references_gaussian_or_pillows_approximation():
    """--blur gaussian is cv2.GaussianBlur(img, (23, 23), sigma): the 23 x 23 Gaussian, border
    mirrored without repeating the edge, as torchvision's 2-D convolution computes it (slowly)."""
    for img in blur_test_images():
        for sigma in (0.1, 0.5, 1.05, 1.6, 2.0):                 # the ends of the range too
            ours = np.asarray(data.gaussian_blur(img, sigma), dtype=np.int64)
            exact = np.asarray(torchvision.transforms.functional.gaussian_blur(img, 23, sigma),
                               dtype=np.int64)
            assert np.abs(ours - exact).max() <= 1                 # float rounding, nothing more
            assert (ours != exact).mean() < 1e-3
    img = blur_test_images()[0]
    views = {}
    for blur in ('gaussian', 'pillow'):
        rng = random.Random(3)
        views[blur] = np.asarray(data.color_augment(img, rng, 1.0, 0.0, jitter_p=0, gray_p=0,
                                                    blur=blur), dtype=np.float64)
    rng = random.Random(3)
    for _ in range(3):                               # jitter, grayscale and blur coin flips
        rng.random()
    sigma = rng.uniform(0.1, 2.0)                    # the draw color_augment made
    assert np.array_equal(views['gaussian'], np.asarray(data.gaussian_blur(img, sigma)))
    assert not np.array_equal(views['pillow'], views['gaussian'])
    assert np.abs(views['pillow'] - views['gaussian']).mean() < 3   # the same blur, approximately
    for fn in (data.color_augment, data.two_views, data.R2ODataset):      # the reference's, by default
        assert inspect.signature(fn).parameters['blur'].default == 'gaussian'


def test_gaussian_blur_of_an_image_smaller_than_its_reach():
    """Sides under 12 px, where a 23-tap kernel reaches past the mirrored border: the border is
    mirrored again (as OpenCV and numpy's 'reflect' padding do), one pixel stays one colour."""
    rng = np.random.default_rng(1)
    for h, w in ((1, 1), (1, 7), (2, 3), (5, 11), (11, 40)):
        small = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        big = np.pad(small, ((30, 30), (30, 30), (0, 0)), mode='reflect')
        for sigma in (0.1, 1.0, 2.0):
            ours = np.asarray(data.gaussian_blur(Image.fromarray(small), sigma), dtype=np.int64)
            exact = np.asarray(torchvision.transforms.functional.gaussian_blur(
                Image.fromarray(big), 23, sigma), dtype=np.int64)[30:30 + h, 30:30 + w]
            assert ours.shape == (h, w, 3)
            assert np.abs(ours - exact).max() <= 1
    one = np.asarray(data.gaussian_blur(Image.new('RGB', (1, 1), (10, 200, 30)), 2.0))
    assert one.tolist() == [[[10, 200, 30]]]


def torchvision_colour(view, p):
    """One view's colour augmentation by torchvision's own tensor functions, in float, one
    operation at a time in the drawn order: what data.photometric must compute for a batch."""
    import torchvision.transforms.functional as TF
    x = view.float() / 255
    if p[0]:
        ops = [lambda y: TF.adjust_brightness(y, p[1].item()),
               lambda y: TF.adjust_contrast(y, p[2].item()),
               lambda y: TF.adjust_saturation(y, p[3].item()),
               lambda y: TF.adjust_hue(y, p[4].item())]
        for op in p[5:9].long().tolist():
            x = ops[op](x)
    if p[9]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p[10]:
        x = TF.gaussian_blur(x, [23, 23], [p[11].item()] * 2)
    if p[12]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD)


def test_colour_augmentation_on_the_device_is_torchvisions_and_pillows_to_a_grey_level():
    """data.photometric on a batch computes, image by image, what torchvision's tensor functions
    compute in each image's drawn order (to float rounding: all but 0.1% of the values within
    0.06 grey levels, the rest at solarize's threshold); against the per-image Pillow path
    (--photometric-on loader, 8-bit rounding after every operation) it stays within a grey level
    without the jitter, and on average within 2.5 grey levels with it (99% of values within 8).
    The parameters are the per-image path's own draws: the generator ends in the same state."""
    import torchvision.transforms.functional as TF
    views, params, pillow = [], [], []
    for i in range(24):
        img = Image.fromarray(data.synthetic_scene(i, 96)[0]).resize((48, 48))
        for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2)):
            per_image, batched = random.Random(i), random.Random(i)
            pillow.append(data.normalize(data.color_augment(img, per_image, blur_p, solarize_p)))
            params.append(data.draw_photometric(batched, blur_p, solarize_p))
            assert per_image.getstate() == batched.getstate()
            views.append(TF.pil_to_tensor(img))
    views, params = torch.stack(views), torch.stack(params)
    assert params[:, 0].sum() > 20 and params[:, 9].sum() > 3 and params[:, 12].sum() > 2
    assert len({tuple(p[5:9].tolist()) for p in params if p[0]}) > 8     # many orders
    out = data.photometric(views, params)
    for view, p, o in zip(views, params, out):
        off = (o - torchvision_colour(view, p)).abs() > 1e-3               # 0.06 grey level
        assert off.float().mean() < 1e-3, p       # but a value at solarize's threshold may flip
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]
    for p, o, ref in zip(params, out, pillow):
        levels = ((o - ref) * std * 255).abs()
        if p[0]:
            assert levels.mean() <= 2.5 and levels.quantile(0.99) <= 8, p
        else:
            assert levels.max() <= 1.0, p


def test_views_finished_on_the_device_are_the_loaders_views(tmp_path):
    """--photometric-on device (the default) and loader give a sample the same crop boxes, flips
    and parameters, and after data.finish_on_device views within the stated grey levels."""
    common = dict(n_images=4, scene_size=96, image_size=64, n_segments=20,
                  superpixel_map=r2o.superpixel_map)
    device = data.SyntheticDataset(**common)
    loader = data.SyntheticDataset(photometric_on='loader', **common)
    batch = data.collate([device[(3, i)] for i in range(4)])
    reference = data.collate([loader[(3, i)] for i in range(4)])
    assert batch['view1'].dtype == batch['raw'].dtype == torch.uint8
    assert torch.equal(batch['boxes'], reference['boxes'])
    assert torch.equal(batch['flips'], reference['flips'])
    finished = data.finish_on_device(dict(batch))
    assert 'photometric' not in finished
    assert torch.allclose(finished['raw'], reference['raw'], atol=1e-5)
    std = torch.tensor(data.IMAGENET_STD)[:, None, None]
    for name in ('view1', 'view2'):
        assert ((finished[name] - reference[name]) * std * 255).abs().mean() <= 2.5
    with pytest.raises(data.DataError, match='--photometric-on loader'):
        data.SyntheticDataset(blur='pillow', **common)


def test_flipped_view_gets_a_flipped_mask_end_to_end():
    """A view with flip=True shows the image mirrored, and its mask is mirrored the same way."""
    ds = data.SyntheticDataset(n_images=1, scene_size=64, image_size=64, n_segments=20,
                               superpixel_map=r2o.superpixel_map,
                               flip_p=1.0)
    s = ds[(0, 0)]
    assert s['flips'].all()
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, :, :3] = 1                                 # a strip at the left of the image
    box = torch.tensor([[0., 0., 1., 1.]])
    m = r2o.view_masks(labels, box, torch.tensor([True]), 2, 4).view(2, 4, 4)
    assert m[1, :, -1].min() > 0.5 and m[1, :, 0].max() == 0       # now on the right


def write_odd_images(folder):
    """One file per Pillow mode we must read, plus two broken files. Returns the broken names."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / 'rgb.jpg')
    Image.fromarray(rgb).convert('L').save(folder / 'gray.png')
    Image.fromarray(rgb).convert('RGBA').save(folder / 'rgba.png')
    Image.fromarray(rgb).convert('P').save(folder / 'palette.png')
    Image.fromarray(rgb).convert('CMYK').save(folder / 'cmyk.jpg')
    Image.fromarray((np.arange(2000).reshape(40, 50) * 30).astype(np.uint16)).save(folder / 'deep.png')
    whole = (folder / 'rgb.jpg').read_bytes()
    (folder / 'truncated.jpg').write_bytes(whole[:len(whole) // 2])
    (folder / 'notanimage.png').write_bytes(b'hello')
    return {'truncated.jpg', 'notanimage.png'}


def test_every_pillow_mode_becomes_rgb(tmp_path):
    write_odd_images(tmp_path)
    for name in ('rgb.jpg', 'gray.png', 'rgba.png', 'palette.png', 'cmyk.jpg', 'deep.png'):
        img = data.load_image(tmp_path / name)
        assert img.mode == 'RGB' and img.size == (50, 40)
    deep = np.asarray(data.load_image(tmp_path / 'deep.png'))
    assert deep.min() == 0 and deep.max() == 255 and len(np.unique(deep)) > 100  # scaled, not clipped


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    broken = write_odd_images(tmp_path / 'imgs')
    ds = data.ImageFolderDataset(tmp_path / 'imgs', image_size=32, n_segments=10,
                                 superpixel_map=r2o.superpixel_map)
    reported = []
    for i in range(len(ds)):
        s = ds[(0, i)]
        assert s['view1'].shape == (3, 32, 32)
        reported += s['bad']
    assert {Path(r.split(' (')[0]).name for r in reported} == broken


def test_too_many_unreadable_images_stop_the_run(tmp_path):
    write_odd_images(tmp_path / 'imgs')
    args = tiny_args(tmp_path, 'bad', '--data', str(tmp_path / 'imgs'), '--batch-size', '4')
    with pytest.raises(data.DataError, match='unreadable'):
        r2o.main(args)


def test_missing_or_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / 'empty').mkdir()
    for folder in ('empty', 'missing'):
        res = run_cli('r2o.py', '--data', str(tmp_path / folder), '--output-dir', str(tmp_path / 'o'))
        assert res.returncode == 2
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith('error:')
        assert not (tmp_path / 'o').exists()                 # nothing left behind


def test_imagenet_layout_uses_the_train_folder(tmp_path):
    for split in ('train/n01', 'train/n02', 'val/n01'):
        (tmp_path / split).mkdir(parents=True)
        Image.new('RGB', (20, 20)).save(tmp_path / split / 'a.jpg')
    assert [Path(p).parent.name for p in data.find_images(tmp_path)[0]] == ['n01', 'n02']



def test_images_are_listed_in_path_order(tmp_path):
    """The order (each image's index, the cache key) is sorted(paths), whatever the names:
    files beside folders, names that sort around '/' ('n01-a', 'n01.b'), capitals."""
    for name in ('n01/x.png', 'n01/sub/0.png', 'n01/sub.png', 'n01/a.png', 'n01-a/y.png',
                 'n01.b/z.png', 'n01.png', 'A/r.jpg', 'a b/q.jpg'):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (4, 4)).save(tmp_path / name)
    files, _ = data.find_images(tmp_path)
    assert [Path(p) for p in files] == sorted(tmp_path.rglob('*.*g')) and len(files) == 9

def image_tree(root, *folders):
    for folder in folders:
        (root / folder).mkdir(parents=True)
        Image.new('RGB', (20, 20)).save(root / folder / 'a.jpg')
    return root


def test_a_dataset_root_holding_validation_images_is_refused(tmp_path):
    """A scan that meets val or test images below --data stops, naming them: the authors'
    imagenet/images/{train,val} and COCO's {train2017,val2017,test2017} would train on both."""
    authors = image_tree(tmp_path / 'imagenet', 'images/train/n01', 'images/train/n02',
                         'images/val/n01')
    coco = image_tree(tmp_path / 'coco', 'train2017', 'val2017', 'test2017', 'annotations')
    for root, held_out, train in ((authors, ['images/val'], 'images/train'),
                                  (coco, ['test2017', 'val2017'], 'train2017')):
        with pytest.raises(data.DataError) as e:
            data.find_images(root)
        assert all(str(root / folder) in str(e.value) for folder in held_out)
        assert f'--data {root / train}' in str(e.value)                  # what to give instead
        assert len(data.find_images(root / train)[0]) == len(list((root / train).rglob('*.jpg')))
    for name in ('Val', 'valid', 'Validation', 'test', 'val_2014', 'test-dev'):
        with pytest.raises(data.DataError, match=name):
            data.find_images(image_tree(tmp_path / f'root-{name}', 'train2017', name))
    # class folders that only contain the letters, or start with them as a word of their own
    classes = image_tree(tmp_path / 'classes', 'interval', 'valley', 'testudo', 'n01/retest')
    assert len(data.find_images(classes)[0]) == 4
    res = run_cli('r2o.py', '--data', str(authors), '--output-dir', str(tmp_path / 'o'))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith('error:') and str(authors / 'images' / 'val') in res.stderr
    assert not (tmp_path / 'o').exists()
    # through links: a linked dataset root still shows its val folder; a link named val is one
    linked = tmp_path / 'linked'
    linked.mkdir()
    (linked / 'imagenet').symlink_to(authors)
    with pytest.raises(data.DataError, match=re.escape(str(linked / 'imagenet/images/val'))):
        data.find_images(linked)
    (tmp_path / 'subset').mkdir()
    (tmp_path / 'subset' / 'n01').symlink_to(authors / 'images/train/n01')
    (tmp_path / 'subset' / 'val').symlink_to(authors / 'images/val/n01')
    with pytest.raises(data.DataError, match=re.escape(str(tmp_path / 'subset' / 'val'))):
        data.find_images(tmp_path / 'subset')


def png_classes(root, counts):
    """Class folders of tiny random PNGs: counts maps a class name to its number of images."""
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(root / name / f'{i}.png')
    return root


def test_a_subset_of_linked_class_folders_trains_like_a_real_one(tmp_path, capsys):
    """ImageNet-100 style: train/ holds links to class folders of a shared copy, beside a real
    class folder and a link that leads nowhere (a class on a disk not mounted). Every image the
    links reach is trained on; the dead link is named in the start-up lines."""
    shared = png_classes(tmp_path / 'imagenet' / 'train', {'n01': 3, 'n02': 3, 'n03': 5})
    train = png_classes(tmp_path / 'in100' / 'train', {'n04': 2})
    for name in ('n01', 'n02'):
        (train / name).symlink_to(shared / name, target_is_directory=True)
    (train / 'n05').symlink_to(tmp_path / 'unmounted' / 'n05')
    args = tiny_args(tmp_path, 'run', '--data', str(tmp_path / 'in100'), '--arch', 'resnet18',
                     '--epochs', '1')
    r2o.main(args)
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 1                                     # 8 images, batch 8
    assert [str(Path(p).relative_to(train)) for p in r2o.build_dataset(args).files] == [
        'n01/0.png', 'n01/1.png', 'n01/2.png', 'n02/0.png', 'n02/1.png', 'n02/2.png',
        'n04/0.png', 'n04/1.png']
    out = capsys.readouterr().out
    assert out.startswith('settings:') and '8 images, 1 process(es)' in out
    dead = [line for line in out.splitlines() if 'no file or folder' in line]
    assert dead == [f'skipped 1 link under --data that leads to no file or folder (moved, or on '
                    f'a disk not mounted?), e.g. {train / "n05"} -> {tmp_path / "unmounted/n05"}']
    # the default output folder takes the name --data is given by, not its link's target
    (tmp_path / 'alias').symlink_to(tmp_path / 'in100')
    named = r2o.resolve_args(r2o.get_args_parser().parse_args(['--data', str(tmp_path / 'alias')]))
    assert Path(named.output_dir).name == 'alias-cosine'


def test_a_cycle_of_links_is_scanned_once(tmp_path):
    """Links back to a folder above, and a second link to a folder already scanned: the scan
    ends, and every image is listed once, by the first path that reaches it."""
    root = png_classes(tmp_path / 'root', {'n01': 2})
    shared = png_classes(tmp_path / 'shared', {'n02': 2})
    (root / 'n02').symlink_to(shared / 'n02')
    (root / 'n01' / 'up').symlink_to(root)                        # a cycle inside --data
    (shared / 'n02' / 'back').symlink_to(root)                    # and one through a link
    (root / 'n03').symlink_to(shared / 'n02')                     # n02 again, by another name

    def endless(signum, frame):
        raise RuntimeError('the scan follows the links round and round')
    previous = signal.signal(signal.SIGALRM, endless)
    signal.alarm(60)               # unguarded, the paths double with each round: 2^40 folders
    try:
        files, skipped = data.find_images(root)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [str(Path(p).relative_to(root)) for p in files] == ['n01/0.png', 'n01/1.png', 'n02/0.png',
                                                         'n02/1.png']
    assert skipped == []


def test_the_file_list_is_one_buffer_that_gives_back_every_path(tmp_path):
    """data.PathList: the paths as given (a name that is not UTF-8 too), in order, by index,
    slice and iteration, pickled in one piece (what a loader worker or another rank receives)."""
    odd = os.fsdecode(b'caf\xe9.png')                     # Latin-1 bytes: not UTF-8
    paths = [str(tmp_path / 'n01' / 'a.png'), str(tmp_path / 'n01' / odd), '/x/\u00fc.jpg', 'y.png']
    files = data.PathList(paths)
    assert len(files) == 4 and list(files) == paths and files[-1] == 'y.png'
    assert files[1:3] == paths[1:3] and os.fsencode(files[1]).endswith(b'caf\xe9.png')
    back = pickle.loads(pickle.dumps(files))
    assert list(back) == paths and isinstance(back.buffer, np.ndarray)
    with pytest.raises(IndexError):
        files[4]


def listing_rank(rank, port, cases, out):
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                         world_size=2)
    if rank > 0:                                   # a scan on this rank leaves a mark
        data.find_images = lambda root: Path(f'{out}.scanned-by-{rank}').touch()
    results = []
    for roots in cases:
        try:
            results.append(('files', list(r2o.listing_of_the_job(roots[rank])[0])))
        except data.DataError as e:
            results.append(('error', str(e)))
    torch.save(results, f'{out}.{rank}')
    # both ranks wait here and leave the group to process exit: torch 2.1's destroy_process_group
    # hung in about 1 run of 10 in this test (gloo, either store)
    torch.distributed.barrier()


def test_the_image_list_is_scanned_once_per_job_and_sent_to_every_rank(tmp_path):
    """Under torchrun rank 0 walks --data and the other ranks receive its list without looking
    at the folders; a refusal reaches every rank."""
    root = tmp_path / 'imgs'
    for name in ('n01/0.png', 'n02/1.png'):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (4, 4)).save(root / name)
    absent = str(tmp_path / 'absent')
    cases = [(str(root), str(root)), (absent, absent)]
    torch.multiprocessing.spawn(listing_rank, (free_port(), cases, str(tmp_path / 'out')), nprocs=2)
    expected = [('files', [str(root / 'n01/0.png'), str(root / 'n02/1.png')]),
                ('error', f'--data {absent}: no such folder')]
    for rank in (0, 1):
        assert torch.load(tmp_path / f'out.{rank}') == expected
    assert not (tmp_path / 'out.scanned-by-1').exists()


def test_loader_workers_default_to_the_cores_each_training_process_can_have(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(96)), raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')
    assert r2o.default_workers() == 11                  # 96 cores, 8 GPUs, one core each kept
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    assert r2o.default_workers() == 95
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0}, raising=False)
    assert r2o.default_workers() == 1


def test_prebuild_fills_the_superpixel_cache_resumably_and_start_up_says_how_full(tmp_path,
                                                                                    capsys):
    """--prebuild-superpixels computes every image's superpixels into the cache with loader
    workers and exits without an output folder; run again it computes nothing. A run's start-up
    line says how full the cache is and what the rest will cost the first epoch."""
    root = png_classes(tmp_path / 'imgs', {'n01': 6, 'n02': 6})
    args = r2o.resolve_args(tiny_args(tmp_path, 'pre', '--data', str(root), '--arch', 'resnet18'))
    dataset = r2o.build_dataset(args)
    assert r2o.cache_line(dataset, 2, 1).startswith('superpixel cache: 0% filled')
    for i in range(6):
        dataset.superpixels(i)
    line = r2o.cache_line(dataset, 2, 1)
    assert line.startswith('superpixel cache: 50% filled') and 'core-hours' in line
    expected = [dataset.superpixels(i) for i in range(12)]       # fills the rest, to compare
    dataset.cache.path.unlink()
    for workers in ('2', '0'):
        r2o.main(tiny_args(tmp_path, 'pre', '--data', str(root), '--arch', 'resnet18',
                           '--prebuild-superpixels', '--workers', workers))
    out = capsys.readouterr().out
    assert '12/12: 12 computed, 0 were cached, 0 unreadable' in out
    assert '12/12: 0 computed, 12 were cached, 0 unreadable' in out
    assert not (tmp_path / 'pre').exists()                      # nothing but the cache
    dataset = r2o.build_dataset(args)
    assert r2o.cache_line(dataset, 2, 1).startswith('superpixel cache: full')
    assert all(np.array_equal(dataset.cache.get(i), expected[i]) for i in range(12))


def test_links_that_lead_nowhere_are_skipped_and_named(tmp_path):
    """A dead link (to a file, to a folder, or in a loop of links) is no image: left out and
    reported, not met later by a loader worker. With nothing else, the error names them."""
    root = png_classes(tmp_path / 'root', {'n01': 2})
    (root / 'n01' / 'gone.png').symlink_to(tmp_path / 'moved.png')
    (root / 'n02').symlink_to(tmp_path / 'unmounted' / 'n02')
    (root / 'a').symlink_to(root / 'b')
    (root / 'b').symlink_to(root / 'a')
    (root / 'n01' / 'linked.png').symlink_to(root / 'n01' / '0.png')   # a live file link counts
    ds = data.ImageFolderDataset(root, image_size=32, n_segments=10,
                                 superpixel_map=r2o.superpixel_map)
    assert [Path(p).name for p in ds.files] == ['0.png', '1.png', 'linked.png']
    assert ds.skipped == [str(root / 'a'), str(root / 'b'), str(root / 'n01' / 'gone.png'),
                          str(root / 'n02')]
    args = r2o.resolve_args(tiny_args(tmp_path, 'o', '--data', str(root)))
    run = r2o.run_constants(args, 0, 1, torch.device('cpu'), 1)
    lines = r2o.startup_lines(args, run, len(ds), 1, torch.device('cpu'), ds.skipped)
    assert lines[1] == (f'skipped 4 links under --data that lead to no file or folder (moved, '
                        f'or on a disk not mounted?), e.g. {root / "a"} -> {root / "b"}')
    dead = tmp_path / 'dead'
    dead.mkdir()
    (dead / 'n01').symlink_to(tmp_path / 'unmounted' / 'n01')
    with pytest.raises(data.DataError, match=r'no image files found .*; skipped 1 link .* e\.g\. '
                       + re.escape(str(dead / 'n01'))):
        data.find_images(dead)


def test_a_run_refused_at_start_up_leaves_nothing_on_disk(tmp_path):
    """Bad --data, a bad flag or combination, too few images, a missing --resume: the error
    comes before the output folder or the superpixel cache is made."""
    (tmp_path / 'empty').mkdir()
    few = png_classes(tmp_path / 'few', {'n01': 3})
    held_out = image_tree(tmp_path / 'coco', 'train2017', 'val2017')
    for extra in (['--data', str(tmp_path / 'missing')], ['--data', str(tmp_path / 'empty')],
                  ['--data', str(held_out)], ['--data', str(few)], ['--seed', '-1'],
                  ['--cluster-batch', '3'], ['--image-size', '36'],
                  ['--resume', str(tmp_path / 'missing.pt')]):
        with pytest.raises(data.DataError):
            r2o.main(tiny_args(tmp_path, 'o', *extra))
        assert sorted(p.name for p in tmp_path.iterdir()) == ['coco', 'empty', 'few'], extra


# ================================ superpixel cache ================================

def test_cache_returns_what_was_stored_and_rejects_half_written_rows(tmp_path):
    cache = data.SuperpixelCache(tmp_path, 'k', n_images=3, size=4)
    labels = np.arange(16).reshape(4, 4)
    assert cache.get(1) is None
    cache.put(1, labels)
    other = data.SuperpixelCache(tmp_path, 'k', n_images=3, size=4)   # another process
    assert np.array_equal(other.get(1), labels)
    rows = other._open()
    rows[2, :-2] = 5                                     # a write interrupted before its CRC
    assert other.get(2) is None and cache.get(2) is None
    rows[1, 3] = 99                                      # a corrupted row
    assert cache.get(1) is None


def test_cache_never_changes_results(tmp_path):
    """Two epochs with and without the superpixel cache, same seed: identical masks and weights."""
    with_cache = tiny_args(tmp_path, 'cached')
    without = tiny_args(tmp_path, 'uncached', '--superpixel-cache', 'none')
    r2o.main(with_cache)
    r2o.main(without)
    a = torch.load(tmp_path / 'cached' / 'checkpoint.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'uncached' / 'checkpoint.pt', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
    ds_cached = r2o.build_dataset(with_cache)
    ds_plain = r2o.build_dataset(without)
    assert ds_cached.cache.path.exists()
    for i in range(len(ds_plain)):
        assert ds_cached.cache.get(i) is not None        # filled during training
        assert torch.equal(ds_cached[(1, i)]['superpixels'], ds_plain[(1, i)]['superpixels'])



def test_cache_key_follows_the_paths_under_data_not_the_links_targets(tmp_path):
    """The same images reached through links (a linked dataset root, a folder of links to every
    class, links to another copy of the images) share the real copy's cache file. A linked
    subset has its own file: rows are indexed by image index and the key hashes the whole file
    list, so its superpixels are computed again (the same maps) and the full set's file is
    never touched."""
    full = png_classes(tmp_path / 'imagenet' / 'train', {'n01': 2, 'n02': 2, 'n03': 2})
    shutil.copytree(tmp_path / 'imagenet', tmp_path / 'copy')     # the same set on another disk
    (tmp_path / 'alias').symlink_to(tmp_path / 'imagenet')
    for name, target, classes in (('linked', full, ('n01', 'n02', 'n03')),
                                  ('in100', full, ('n01', 'n02')),
                                  ('in100-copy', tmp_path / 'copy' / 'train', ('n01', 'n02'))):
        (tmp_path / name / 'train').mkdir(parents=True)
        for c in classes:
            (tmp_path / name / 'train' / c).symlink_to(target / c)
    ds = {name: data.ImageFolderDataset(tmp_path / name, image_size=32, n_segments=10,
                                        cache_dir=tmp_path / 'cache',
                                        superpixel_map=r2o.superpixel_map)
          for name in ('imagenet', 'alias', 'linked', 'in100', 'in100-copy')}
    assert ds['alias'].cache.path == ds['linked'].cache.path == ds['imagenet'].cache.path
    assert ds['in100-copy'].cache.path == ds['in100'].cache.path != ds['imagenet'].cache.path
    for i in range(len(ds['in100'])):
        ds['in100'][(0, i)]
    assert not ds['imagenet'].cache.path.exists()
    for i in range(len(ds['linked'])):
        ds['linked'][(0, i)]
    for i in range(len(ds['in100'])):                    # the same image at the same index
        assert Path(ds['in100'].files[i]).relative_to(tmp_path / 'in100') == \
            Path(ds['imagenet'].files[i]).relative_to(tmp_path / 'imagenet')
        assert np.array_equal(ds['imagenet'].cache.get(i), ds['in100'].cache.get(i))
    assert all(ds['imagenet'].cache.get(i) is not None for i in range(len(ds['imagenet'])))

# ================================ runs: checkpoints, resume, export ================================

def test_checkpoint_loads_weights_only_and_resume_matches_an_uninterrupted_run(tmp_path):
    r2o.main(tiny_args(tmp_path, 'straight'))
    r2o.main(tiny_args(tmp_path, 'resumed', '--stop-after', '1'))
    first = torch.load(tmp_path / 'resumed' / 'checkpoint.pt', weights_only=True)
    assert first['epoch'] == 1 and not (tmp_path / 'resumed' / 'backbone.pt').exists()
    assert set(first) >= {'model', 'optimizer', 'epoch', 'step', 'args'}
    assert first['args']['arch'] == 'resnet18'
    r2o.main(tiny_args(tmp_path, 'resumed'))             # same command again: continues
    a = torch.load(tmp_path / 'straight' / 'checkpoint.pt', weights_only=True)
    b = torch.load(tmp_path / 'resumed' / 'checkpoint.pt', weights_only=True)
    assert a['epoch'] == b['epoch'] == 2 and a['step'] == b['step']
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    log = [json.loads(line) for line in (tmp_path / 'resumed' / 'log.txt').read_text().splitlines()]
    assert [e['epoch'] for e in log] == [1, 2]
    assert sorted(p.name for p in (tmp_path / 'straight').glob('masks-epoch*.png')) == \
        ['masks-epoch0001.png', 'masks-epoch0002.png']


def test_resume_refuses_other_settings(tmp_path):
    r2o.main(tiny_args(tmp_path, 'run', '--stop-after', '1'))
    with pytest.raises(data.DataError, match='--arch'):
        r2o.main(tiny_args(tmp_path, 'run', '--arch', 'resnet34'))
    # augmentation and seed change what the remaining steps compute: refused as well
    for flag, value in (('--flip-p', '1.0'), ('--blur', 'pillow'), ('--seed', '7'),
                        ('--kmeans-iters', '6')):
        with pytest.raises(data.DataError, match=flag):
            r2o.main(tiny_args(tmp_path, 'run', flag, value))
    # how it runs may change: printing, saving, loader workers, the lr after a divergence
    r2o.main(tiny_args(tmp_path, 'run', '--print-freq', '1', '--save-every', '1', '--lr', '0.1'))
    assert (tmp_path / 'run' / 'checkpoint-epoch0002.pt').is_file()


def test_mask_pictures_show_images_spread_over_the_dataset():
    picks = r2o.picture_indices(100_000)             # e.g. ImageNet: 8 classes apart, not one
    gaps = np.diff(picks)
    assert len(picks) == 8 and picks[0] == 0 and picks[-1] == 99_999
    assert gaps.min() >= 14_285 and gaps.max() <= 14_286
    assert r2o.picture_indices(5) == [0, 1, 2, 3, 4]    # fewer images than pictures: all


def test_backbone_loads_into_torchvision_resnet(tmp_path):
    r2o.main(tiny_args(tmp_path, 'export', '--epochs', '1'))
    state = torch.load(tmp_path / 'export' / 'backbone.pt', weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(missing) == ['fc.bias', 'fc.weight'] and unexpected == []


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    r2o.main(tiny_args(tmp_path, 'nan', '--stop-after', '1'))
    before = (tmp_path / 'nan' / 'checkpoint.pt').read_bytes()
    monkeypatch.setattr(r2o, 'mask_loss', lambda p1, *rest: (p1 * float('nan')).sum())
    with pytest.raises(FloatingPointError, match='last good'):
        r2o.main(tiny_args(tmp_path, 'nan'))
    assert (tmp_path / 'nan' / 'checkpoint.pt').read_bytes() == before


@pytest.mark.parametrize('schedule', [['--k-schedule', 'none'],
                                      ['--k-schedule', 'constant', '--k-max', '1']])
def test_baselines_train(tmp_path, schedule):
    r2o.main(tiny_args(tmp_path, 'base', '--epochs', '1', *schedule))
    log = json.loads((tmp_path / 'base' / 'log.txt').read_text())
    assert math.isfinite(log['loss'])
    assert log['k'] == ('superpixels' if 'none' in schedule else 1)
    if 'none' not in schedule:
        assert log['masks_per_image'] == 1.0             # BYOL: one whole-crop mask per image


def training_command(out, cache, *launcher, workers=2, device='cpu'):
    """A small synthetic run from the command line, as a user starts it: 2 epochs of 6 steps,
    loader workers on (the default), a progress line every step."""
    return [sys.executable, *(launcher or ['r2o.py']),
            '--synthetic-images', '48', '--image-size', '32', '--batch-size', '8', '--epochs', '2',
            '--superpixels', '12', '--k-max', '8', '--hidden-dim', '64', '--out-dim', '32',
            '--workers', str(workers), '--print-freq', '1', '--device', device,
            '--output-dir', str(out), '--superpixel-cache', str(cache)]


def kill_when_printed(cmd, marker):
    """Start `cmd` in its own process group and SIGKILL the whole group (launcher, trainers,
    loader workers) as soon as a line contains `marker`: a run dying as a job scheduler kills it."""
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=cli_env(), start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, ''.join(lines[-30:])


def assert_same_final_weights(a, b):
    a = torch.load(a / 'checkpoint.pt', weights_only=True)
    b = torch.load(b / 'checkpoint.pt', weights_only=True)
    assert a['epoch'] == b['epoch'] == 2 and a['step'] == b['step']
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_deterministic_sums_k_means_by_a_matrix_product_on_a_gpu_only(tmp_path):
    """--deterministic: k-means's one-hot sums where atomic additions would vary (a GPU); a CPU
    keeps index_add_, deterministic already."""
    args = r2o.resolve_args(tiny_args(tmp_path, 'det', '--deterministic', '--no-amp'))
    on_cpu = r2o.run_constants(args, 0, 1, torch.device('cpu'), 1)['cluster']
    on_gpu = r2o.run_constants(args, 0, 1, torch.device('cuda'), 1)['cluster']
    greedy = r2o.kmeans_seeds
    assert on_cpu.func is r2o.kmeans and on_cpu.keywords == dict(seeding=greedy, deterministic=False)
    assert on_gpu.func is r2o.kmeans and on_gpu.keywords == dict(seeding=greedy, deterministic=True)
    args.deterministic = False
    assert r2o.run_constants(args, 0, 1, torch.device('cuda'), 1)['cluster'].keywords['deterministic'] is False


def test_killed_mid_epoch_and_restarted_ends_bit_identical(tmp_path):
    cache = tmp_path / 'cache'
    straight = subprocess.run(training_command(tmp_path / 'straight', cache), cwd=HERE, env=cli_env(),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    cmd = training_command(tmp_path / 'killed', cache)
    kill_when_printed(cmd, 'epoch 2/2 [3/6]')             # mid-epoch 2: only epoch 1 is saved
    assert torch.load(tmp_path / 'killed' / 'checkpoint.pt', weights_only=True)['epoch'] == 1
    # continued with --deterministic, which may change on resume and changes nothing on a CPU
    again = subprocess.run(cmd + ['--deterministic'], cwd=HERE, env=cli_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert 'resumed from' in again.stdout and 'deterministic' in again.stdout
    assert_same_final_weights(tmp_path / 'straight', tmp_path / 'killed')
    a = torch.load(tmp_path / 'straight' / 'backbone.pt', weights_only=True)
    b = torch.load(tmp_path / 'killed' / 'backbone.pt', weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_killed_and_restarted(tmp_path):
    cache = tmp_path / 'cache'
    launcher = ['-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
                'r2o.py']
    straight = subprocess.run(training_command(tmp_path / 'straight', cache, *launcher),
                              cwd=HERE, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / 'straight' / 'log.txt').read_text().splitlines()]
    assert len(log) == 2
    assert all(e['rank_param_max_diff'] == 0.0 for e in log)     # DDP keeps the ranks identical
    assert log[-1]['images_per_s'] > 0
    cmd = training_command(tmp_path / 'killed', cache, *launcher)
    kill_when_printed(cmd, 'epoch 2/2 [2/3]')
    again = subprocess.run(cmd, cwd=HERE, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_final_weights(tmp_path / 'straight', tmp_path / 'killed')


def test_damaged_checkpoint_is_one_line_and_exit_status_2(tmp_path):
    r2o.main(tiny_args(tmp_path, 'run', '--stop-after', '1', '--save-every', '1'))
    ckpt = tmp_path / 'run' / 'checkpoint.pt'
    ckpt.write_bytes(ckpt.read_bytes()[:1000])           # truncated, as by a full disk
    res = run_cli('r2o.py', *tiny_argv(tmp_path, 'run', '--save-every', '1'), env=cli_env())
    assert res.returncode == 2
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    assert str(ckpt) in err and '--output-dir' in err and 'checkpoint-epoch0001.pt' in err


def test_cluster_batch_clusters_each_group_on_its_own(tmp_path):
    """--cluster-batch 4 on a batch of 8: one target-encoder forward over all 8 images (its
    BatchNorm statistics are the whole batch's, as under SyncBatchNorm on 2 GPUs of 4), then
    k-means on each half alone, as two refine calls in a row with one generator compute it."""
    args, batch = tiny_batch(tmp_path, 'groups', '--cluster-batch', '4')
    model = small_model()
    grouped = batch_masks(model, batch, 3, args, torch.Generator().manual_seed(5))
    with torch.no_grad():
        features = r2o.encoder_features(model.target_encoder, batch['raw'], 'layer3')
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([r2o.refine(features[s], batch['superpixels'][s], 3, args.kmeans_iters, g,
                                   n_superpixels=batch['n_superpixels'])
                        for s in (slice(0, 4), slice(4, 8))])
    for view in (0, 1):
        expected = r2o.view_masks(labels, batch['boxes'][:, view], batch['flips'][:, view], 3,
                                  args.image_size // 32)
        assert torch.equal(grouped[view], expected)
    args.cluster_batch = None
    whole = batch_masks(model, batch, 3, args, torch.Generator().manual_seed(5))
    assert not torch.equal(grouped[0], whole[0])         # one k-means over 8 images differs
    with pytest.raises(ValueError, match='groups of 3'):
        r2o.refine(features, batch['superpixels'], 3, group=3)
    with pytest.raises(data.DataError, match='multiple of --cluster-batch 3'):
        r2o.resolve_args(tiny_args(tmp_path, 'bad', '--cluster-batch', '3'))


def test_cluster_groups_loss_and_gradients_are_the_mean_of_the_groups_losses(tmp_path, monkeypatch):
    """--cluster-batch 4 on a batch of 8: the loss and gradients are those of the mean of the two
    halves' losses, each half averaged over its own valid pairs (as two GPUs' losses under DDP),
    with BatchNorm over the whole batch (as SyncBatchNorm over the two GPUs). The halves hold
    deliberately unequal numbers of pairs."""
    args, batch = tiny_batch(tmp_path, 'halves', '--image-size', '96', '--cluster-batch', '4')
    model = small_model()
    m1, m2, _ = batch_masks(model, batch, 4, args, torch.Generator().manual_seed(1))
    m1[4:, 1:] = 0                                       # the second half: mask 0 alone
    valid = r2o.mask_overlap(m1, m2)
    assert valid[:4].sum() > 2 * valid[4:].sum() > 0
    reference = copy.deepcopy(model)
    ours = model(batch['view1'], batch['view2'], m1, m2, groups=2)
    ours_grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])

    views, masks = torch.cat([batch['view1'], batch['view2']]), torch.cat([m1, m2])
    def rows(encoder, *mlps):                            # 2B x K x D, the whole batch at once
        x = resnet_layer4(encoder, views).flatten(2)
        x = torch.einsum('bkn,bcn->bkc', masks, x) / masks.sum(-1, keepdim=True).clamp(min=1)
        for m in mlps:
            x = m(x.flatten(0, 1)).view(*masks.shape[:2], -1)
        return x.chunk(2)
    p1, p2 = rows(reference.encoder, reference.projector, reference.predictor)
    with torch.no_grad():
        z1, z2 = rows(reference.target_encoder, reference.target_projector)
    def half_loss(half):
        v = valid[half].float()
        l12 = ((2 - 2 * F.cosine_similarity(p1[half], z2[half], dim=-1)) * v).sum() / v.sum()
        l21 = ((2 - 2 * F.cosine_similarity(p2[half], z1[half], dim=-1)) * v).sum() / v.sum()
        return (l12 + l21) / 2
    theirs = (half_loss(slice(0, 4)) + half_loss(slice(4, 8))) / 2
    their_grads = torch.autograd.grad(theirs, [p for p in reference.parameters() if p.requires_grad])
    assert torch.allclose(ours, theirs, atol=1e-5)
    for a, b in zip(ours_grads, their_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # and the training step hands the groups to the loss
    groups = []

    def spy(p1, p2, z1, z2, valid, groups_in_batch=1):
        groups.append(groups_in_batch)
        return p1.sum()

    monkeypatch.setattr(r2o, 'mask_loss', spy)
    run = r2o.run_constants(args, 0, 1, torch.device('cpu'), 1)
    r2o.step_loss(model, model, batch, 4, torch.Generator().manual_seed(0), run)
    assert groups == [2]


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes: the write that crosses it raises
    OSError(ENOSPC) after writing what fits, as a real full disk does."""

    def __init__(self, path, room):
        super().__init__(path, 'wb')
        self.room = room

    def write(self, b):
        b = memoryview(b)
        fits = max(0, min(len(b), self.room))
        if fits:
            super().write(b[:fits])
            self.room -= fits
        if fits < len(b):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return fits


def test_full_disk_while_saving_is_one_line_that_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    r2o.main(tiny_args(tmp_path, 'full', '--stop-after', '1'))
    ckpt = tmp_path / 'full' / 'checkpoint.pt'
    before = ckpt.read_bytes()
    real_open = open

    def opener(path, mode='r', *args, **kwargs):         # checkpoint files meet a full disk
        return FullDisk(path, 4096) if str(path).endswith('.pt.tmp') else real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(r2o, 'open', opener, raising=False)
    with pytest.raises(data.DataError) as failure:
        r2o.main(tiny_args(tmp_path, 'full'))
    message = str(failure.value)
    assert '\n' not in message and 'is full' in message and str(tmp_path / 'full') in message
    assert f'{ckpt} (after epoch 1) is intact' in message and 'same command' in message
    assert ckpt.read_bytes() == before                   # the last checkpoint: untouched
    assert sorted(p.name for p in ckpt.parent.iterdir() if '.tmp' in p.name) == []   # no partial file
    monkeypatch.undo()
    r2o.main(tiny_args(tmp_path, 'full'))                # with room again: continues from it
    assert torch.load(ckpt, weights_only=True)['epoch'] == 2


def test_any_non_negative_seed_trains(tmp_path):
    for seed in ('18447', str(10 ** 20)):
        r2o.main(tiny_args(tmp_path, f'seed{seed}', '--seed', seed, '--epochs', '1'))
        assert (tmp_path / f'seed{seed}' / 'backbone.pt').is_file()
    with pytest.raises(data.DataError, match='--seed must be a non-negative'):
        r2o.main(tiny_args(tmp_path, 'negative', '--seed', '-1'))


# ================================ the CUDA path, checked on any machine ================================
#
# One training step and eval_cub's clustering run on CUDA semantics without a GPU: tensors and
# modules live on a fake 'cuda' device (FakeTensorMode computes shapes, dtypes and devices, not
# values) with bf16 autocast on. A device mismatch or dtype error raises as it would on a GPU,
# and HostSyncs fails on anything that would make the host wait for the GPU inside a step.
#
# This needs torch 2.10 or later. Before it, torch calls the CUDA driver for fake CUDA tensors
# too (it initialises CUDA when one is made or moved, sets the current device around some of
# their methods, asks the GPU which convolution to use), which fails without a GPU; stubbing
# each of those out would test the stubs. Older torch skips these tests; the GPU tests below
# run the CUDA path for real.

fake_cuda_works = pytest.mark.skipif(
    torch.__version__ < '2.10',
    reason=f'needs torch 2.10 or later (found {torch.__version__}): older torch initialises '
           'CUDA for fake CUDA tensors, which fails without a GPU')


class HostSync(AssertionError):
    pass


class HostSyncs(TorchDispatchMode):
    """Raises HostSync at the first op that would make the host wait for a GPU: reading a value
    (.item(), bool(), int()), a shape that depends on values (nonzero, boolean indexing,
    unique), a copy to the host, or a blocking copy to the device. The message names the op and
    the project line that called it."""
    READS = {'_local_scalar_dense', 'nonzero', 'masked_select', '_unique2', 'unique_dim',
             'unique_consecutive', 'equal', 'is_nonzero', 'masked_scatter', 'repeat_interleave'}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        why = None
        on_gpu = any(isinstance(a, torch.Tensor) and a.device.type == 'cuda' for a in args)
        if name in self.READS and on_gpu:     # a CPU tensor's value (AdamW's step count) waits for no GPU
            why = 'reads a value or a value-dependent shape'
        elif name in ('_to_copy', 'copy_'):
            src = args[0] if name == '_to_copy' else args[1]
            dst = kwargs.get('device', src.device) if name == '_to_copy' else args[0].device
            non_blocking = kwargs.get('non_blocking', args[2] if name == 'copy_' and len(args) > 2 else False)
            if src.device.type == 'cuda' and torch.device(dst).type == 'cpu':
                why = 'copies to the host'
            elif src.device.type == 'cpu' and torch.device(dst).type == 'cuda' and not non_blocking:
                why = 'copies to the device and waits'
        if why:
            caller = next((f'{Path(f.filename).name}:{f.lineno} {f.line}' for f in
                           reversed(traceback.extract_stack())
                           if Path(f.filename).name in ('r2o.py', 'eval_cub.py', 'data.py')), '?')
            raise HostSync(f'host sync: {func} {why}, at {caller}')
        return func(*args, **kwargs)


@contextmanager
def fake_bf16_autocast():
    """CUDA autocast to bf16 (torch.autocast('cuda') switches itself off without a GPU)."""
    enabled, dtype = torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')
    torch.set_autocast_enabled('cuda', True)
    torch.set_autocast_dtype('cuda', torch.bfloat16)
    try:
        yield
    finally:
        torch.set_autocast_enabled('cuda', enabled)
        torch.set_autocast_dtype('cuda', dtype)


def on_fake_cuda(module, mode):
    """A module built on the CPU, its parameters and buffers moved to the fake GPU as r2o.main
    moves the model there, 4-d weights in channels-last. (Done tensor by tensor: Module.to
    cannot swap fake parameters, and modules built on the fake 'cuda' device directly make
    BatchNorm's step counter a constant that fake mode tries to compute for real.)"""
    cuda = torch.device('cuda')
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            layout = torch.channels_last if p.dim() == 4 else torch.preserve_format
            m._parameters[name] = torch.nn.Parameter(
                mode.from_tensor(p.detach()).to(cuda, memory_format=layout), p.requires_grad)
        for name, b in m.named_buffers(recurse=False):
            m._buffers[name] = mode.from_tensor(b).to(cuda)
    return module


def fake_cuda_steps(tmp_path, heads=r2o.heads, vit=False):
    """The training loop's step on fake CUDA tensors, at K=8 (two --cluster-batch groups), K=1
    and superpixel masks: the batch copied to the device, masks, forward under bf16 autocast,
    stand-in gradients (backward needs a real GPU), LARS, EMA and the device-side counters.
    vit: a 2-block ViT and AdamW, its weight decay set and the gradients clipped each step."""
    args, cpu_batch = tiny_batch(tmp_path, 'fake', '--cluster-batch', '4', '--image-size', '64',
                                 on_device=False)             # uint8 views: augmented on the GPU
    assert cpu_batch['view1'].dtype == torch.uint8 and 'photometric' in cpu_batch
    cuda = torch.device('cuda')
    torch.manual_seed(0)
    encoder = tiny_vit() if vit else r2o.build_encoder('resnet18')
    cpu_model = r2o.R2O(encoder, 64, 32, heads)   # as r2o.main on a GPU
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*CUDA is not available')
        model = on_fake_cuda(cpu_model, mode)
        optimizer = (torch.optim.AdamW(r2o.adamw_param_groups(model)) if vit
                     else r2o.LARSForeach(r2o.lars_param_groups(model)))      # as r2o.main
        update = dict(weight_decay=0.1, clip_grad=3.0) if vit else {}
        run = dict(device=cuda, autocast=fake_bf16_autocast, kmeans_iters=3, cluster_batch=4,
                   cluster=functools.partial(r2o.kmeans, deterministic=True))
        sums = torch.zeros(2, dtype=torch.float64, device=cuda)
        results = []
        for step, k in enumerate((8, 1, None)):
            with HostSyncs():
                batch = r2o.batch_to_device(dict(cpu_batch), cuda, channels_last=True)
                loss, pairs = r2o.step_loss(model, model, batch, k, r2o.step_generator(0, 0, step), run)
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.randn_like(p)
                r2o.step_update(model, optimizer, 0.1, 0.99, **update)
                sums += torch.stack([loss.detach().double(), pairs.double()])
            results.append((loss, pairs))
        return results, sums, model


@fake_cuda_works
def test_fake_cuda_training_step_has_no_device_error_and_no_host_sync(tmp_path):
    results, sums, model = fake_cuda_steps(tmp_path)
    for loss, pairs in results:
        assert loss.device.type == 'cuda' and loss.dtype == torch.float32 and loss.dim() == 0
        assert pairs.device.type == 'cuda'
    assert sums.device.type == 'cuda'
    assert model.target_encoder.conv1.weight.device.type == 'cuda'


@fake_cuda_works
def test_fake_cuda_vit_step_has_no_device_error_and_no_host_sync(tmp_path):
    results, sums, model = fake_cuda_steps(tmp_path, vit=True)
    for loss, pairs in results:
        assert loss.device.type == 'cuda' and loss.dtype == torch.float32 and loss.dim() == 0
    assert model.target_encoder.conv_proj.weight.device.type == 'cuda'


def test_mask_pictures_and_evaluation_cluster_with_the_runs_clustering(tmp_path, monkeypatch):
    """The cluster= seam holds everywhere a run clusters: the mask pictures use the run's
    clustering, and eval_cub.py the one --kmeans-seeding names (a stand-in seeding is called)."""
    args, batch = tiny_batch(tmp_path, 'seam')
    model = small_model()
    calls = []

    def stand_in(x, k, iters=30, generator=None, weight=None):
        calls.append(k)
        return torch.arange(x.shape[0]) % k, None
    run = dict(r2o.run_constants(args, 0, 1, torch.device('cpu'), 1), cluster=stand_in)
    vis = {name: batch[name][:2] for name in ('raw', 'superpixels')}
    r2o.visualize(model, vis, 3, run, tmp_path / 'masks.png', 'seam')
    assert calls == [3] and (tmp_path / 'masks.png').is_file()

    seeded = []
    monkeypatch.setitem(r2o.SEEDINGS, 'rounds',
                        lambda x, k, g=None, w=None: seeded.append(k) or x[:k].clone())
    eval_args = eval_cub.resolve_args(eval_cub.get_args_parser().parse_args(
        ['--random-init', '--input-size', '64', '--kmeans-iters', '3', '--limit', '2',
         '--kmeans-seeding', 'rounds']))
    dataset, _ = eval_cub.build_set(eval_args)
    eval_batch = eval_cub.collate([dataset[i] for i in range(2)])
    eval_cub.cluster_batch(r2o.build_encoder('resnet18').eval(), eval_batch, eval_args,
                           torch.device('cpu'), 0)
    assert seeded == [eval_args.k, eval_args.k]                  # one k-means per image


@fake_cuda_works
def test_fake_cuda_check_fails_on_a_host_sync(tmp_path, monkeypatch):
    """The check can fail: a .item() planted in the loss, and the merged empty rows (which count
    the rows on the host, and so are used on a CPU only), each stop it, naming the op and line."""
    with pytest.raises(HostSync, match=r'_local_scalar_dense.*r2o.py:\d+ .*n_keep = int'):
        fake_cuda_steps(tmp_path, r2o.heads_merging_empty_rows)
    planted = r2o.mask_loss
    monkeypatch.setattr(r2o, 'mask_loss', lambda *a, **k: planted(*a, **k) * (planted(*a, **k).item() > -1))
    with pytest.raises(HostSync, match=r'_local_scalar_dense.*r2o.py:\d+ .*return mask_loss'):
        fake_cuda_steps(tmp_path)


@fake_cuda_works
def test_fake_cuda_eval_clustering_has_no_device_error_and_no_host_sync(tmp_path):
    args = eval_cub.resolve_args(eval_cub.get_args_parser().parse_args(
        ['--random-init', '--input-size', '64', '--kmeans-iters', '3', '--limit', '4']))
    dataset, _ = eval_cub.build_set(args)
    batch = eval_cub.collate([dataset[i] for i in range(4)])
    for regions in ('superpixels', 'grid'):
        args.regions = regions
        cpu_net = r2o.build_encoder('resnet18').eval()
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            net = on_fake_cuda(cpu_net, mode)
            with HostSyncs():
                maps = eval_cub.cluster_batch(net, batch, args, torch.device('cuda'), 0)
        side = 16 if regions == 'superpixels' else 4
        assert [(m.device.type, tuple(m.shape)) for m in maps] == [('cuda', (side, side))] * 4


# ================================ on a GPU (skipped without one) ================================
#
# Each fails when the GPU computes something other than the CPU does, beyond the precision it
# was asked for, and runs in well under a minute on one GPU.

def online_update(model, batch, masks, lr=0.5):
    """One step of `model` on `batch` with the given masks: the loss and how far each online
    parameter moved (LARS and EMA included), on the model's device, under the caller's autocast."""
    before = [p.detach().float().clone() for p in model.parameters() if p.requires_grad]
    optimizer = r2o.LARS(r2o.lars_param_groups(model))
    loss = model(batch['view1'], batch['view2'], *masks)
    loss.backward()
    r2o.step_update(model, optimizer, lr, 0.99)
    after = [p.detach().float() for p in model.parameters() if p.requires_grad]
    return loss.item(), [(a - b).cpu() for a, b in zip(after, before)]


@requires_cuda
def test_gpu_bf16_channels_last_step_moves_every_tensor_as_the_cpu_fp32_step(tmp_path):
    """The same weights and masks, one step on the CPU in fp32 and one on the GPU in bf16 and
    channels-last: the losses agree to 2e-2 and the update of every parameter tensor points the
    same way (cosine >= 0.99). A zero, negated or misplaced gradient anywhere fails it."""
    args, batch = tiny_batch(tmp_path, 'gpu', '--image-size', '96')
    model = small_model()
    masks = batch_masks(model, batch, 4, args, torch.Generator().manual_seed(0))[:2]
    gpu_model = copy.deepcopy(model).cuda().to(memory_format=torch.channels_last)
    loss_cpu, update_cpu = online_update(model, batch, masks)
    cuda = torch.device('cuda')
    gpu_batch = r2o.batch_to_device(dict(batch), cuda, channels_last=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss_gpu, update_gpu = online_update(gpu_model, gpu_batch, [m.to(cuda) for m in masks])
    assert abs(loss_gpu - loss_cpu) < 2e-2
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, update_cpu, update_gpu):
        assert a.norm() > 0, name
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0.99, name


@requires_cuda
def test_gpu_eval_cub_matches_the_cpu(tmp_path, monkeypatch):
    """The same k-means draws on both devices (CPU generators), fp32 convolutions on the GPU
    (no TF32): the scores agree to 0.01."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    fake_checkpoint(tmp_path / 'checkpoint.pt')
    on = {d: run_eval(tmp_path / 'checkpoint.pt', '--limit', 16, '--input-size', 64, '--device', d,
                      '--out', tmp_path / f'{d}.json') for d in ('cpu', 'cuda')}
    assert on['cuda']['n_images'] == 16
    for rule in ('majority', 'label_free'):
        for metric in ('fg_iou', 'miou'):
            assert on['cuda']['metrics'][rule][metric] == pytest.approx(
                on['cpu']['metrics'][rule][metric], abs=0.01)


@requires_cuda
def test_gpu_cluster_batch_clusters_each_group_on_its_own(tmp_path):
    """--cluster-batch on CUDA: the groups' clusters are those of k-means on each group's
    features alone (deterministic sums, so the comparison is exact)."""
    args, batch = tiny_batch(tmp_path, 'groups', '--cluster-batch', '4', device='cuda')
    model = small_model().cuda()
    cluster = functools.partial(r2o.kmeans, deterministic=True)
    with torch.no_grad():
        features = r2o.encoder_features(model.target_encoder, batch['raw'], r2o.CLUSTER_LAYER)
    grouped = r2o.refine(features, batch['superpixels'], 3, args.kmeans_iters,
                         torch.Generator().manual_seed(5), 4, batch['n_superpixels'], cluster)
    g = torch.Generator().manual_seed(5)
    alone = torch.cat([r2o.refine(features[s], batch['superpixels'][s], 3, args.kmeans_iters, g,
                                  n_superpixels=batch['n_superpixels'], cluster=cluster)
                       for s in (slice(0, 4), slice(4, 8))])
    assert grouped.is_cuda and torch.equal(grouped, alone)
    whole = r2o.refine(features, batch['superpixels'], 3, args.kmeans_iters,
                       torch.Generator().manual_seed(5), None, batch['n_superpixels'], cluster)
    assert not torch.equal(grouped, whole)


@requires_cuda
def test_gpu_killed_and_restarted_with_deterministic_ends_bit_identical(tmp_path):
    cache = tmp_path / 'cache'
    straight = subprocess.run(training_command(tmp_path / 'straight', cache, device='cuda')
                              + ['--deterministic'], cwd=HERE, env=cli_env(),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert 'deterministic' in straight.stdout and 'bf16 autocast' in straight.stdout
    cmd = training_command(tmp_path / 'killed', cache, device='cuda') + ['--deterministic']
    kill_when_printed(cmd, 'epoch 2/2 [3/6]')
    again = subprocess.run(cmd, cwd=HERE, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_final_weights(tmp_path / 'straight', tmp_path / 'killed')


@requires_cuda
def test_gpu_torchrun_one_nccl_process(tmp_path):
    cmd = training_command(tmp_path / 'nccl', tmp_path / 'cache', '-m', 'torch.distributed.run',
                           '--nproc_per_node=1', f'--master_port={free_port()}', 'r2o.py', device='cuda')
    res = subprocess.run(cmd, cwd=HERE, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'bf16 autocast' in res.stdout and 'cuda:0' in res.stdout
    assert (tmp_path / 'nccl' / 'backbone.pt').exists()


# ================================ eval_cub.py: unsupervised segmentation ================================

def run_eval(*argv):
    args = eval_cub.get_args_parser().parse_args(
        ['--workers', '0', '--kmeans-iters', '10', '--device', 'cpu', *map(str, argv)])
    return eval_cub.main(args)


# ================================ metrics and foreground rules ================================

def test_perfect_prediction_scores_one():
    gt = torch.zeros(6, 6, dtype=torch.bool)
    gt[1:4, 2:5] = True
    assert eval_cub.iou_metrics(gt.clone(), gt) == dict(fg_iou=1.0, bg_iou=1.0, miou=1.0)


def test_all_background_prediction():
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[:, :1] = True                                   # 4 of 16 pixels are foreground
    m = eval_cub.iou_metrics(torch.zeros_like(gt), gt)
    assert m['fg_iou'] == 0.0
    assert m['bg_iou'] == 12 / 16                      # all 12 background pixels, union 16
    assert m['miou'] == pytest.approx(0.375)


def test_partial_overlaps_exact_values():
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[:, :2] = True                                   # columns 0-1
    pred = torch.zeros_like(gt)
    pred[:, :3] = True                                 # columns 0-2
    m = eval_cub.iou_metrics(pred, gt)
    assert m['fg_iou'] == pytest.approx(8 / 12)        # 2 columns shared of 3
    assert m['bg_iou'] == pytest.approx(4 / 8)         # column 3 shared of columns 2-3
    assert m['miou'] == pytest.approx((8 / 12 + 4 / 8) / 2)
    shifted = torch.zeros_like(gt)
    shifted[:, 1:3] = True                             # columns 1-2: one shared of three
    m = eval_cub.iou_metrics(shifted, gt)
    assert m['fg_iou'] == pytest.approx(1 / 3) and m['bg_iou'] == pytest.approx(1 / 3)


def test_majority_vote_names_clusters_by_their_majority():
    clusters = torch.tensor([[0, 0, 1, 1],
                             [0, 0, 1, 1],
                             [2, 2, 3, 3],
                             [2, 2, 3, 3]])
    gt = torch.tensor([[1, 1, 1, 0],                   # cluster 0: 4/4 fg, cluster 1: 1/4
                       [1, 1, 0, 0],
                       [1, 1, 1, 0],                   # cluster 2: 3/4 fg, cluster 3: 2/4 (a tie)
                       [0, 1, 1, 0]], dtype=torch.bool)
    fg = eval_cub.majority_vote(clusters, gt)
    expected = (clusters == 0) | (clusters == 2)       # a tie is not a majority
    assert torch.equal(fg, expected)


def test_majority_vote_recovers_the_truth_from_matching_clusters():
    gt = torch.zeros(8, 8, dtype=torch.bool)
    gt[2:6, 3:7] = True
    clusters = torch.where(gt, 3, 1)                   # ids need not be 0..k-1
    assert torch.equal(eval_cub.majority_vote(clusters, gt), gt)


def test_border_rule_takes_the_clusters_away_from_the_border():
    clusters = torch.zeros(10, 10, dtype=torch.long)
    clusters[:, 5:] = 1                                # two background halves
    clusters[2:5, 2:4] = 2                             # two interior blobs
    clusters[6:8, 6:8] = 3
    assert torch.equal(eval_cub.border_rule(clusters), clusters >= 2)


def test_border_rule_when_every_cluster_touches_the_border():
    clusters = torch.zeros(10, 10, dtype=torch.long)  # border share / area share:
    clusters[:, 8:] = 1                                # (12/36) / (20/100) = 1.67
    clusters[3:7, 0:3] = 2                             # (4/36) / (12/100) = 0.93
    clusters[0:6, 4:8] = 3                             # (4/36) / (24/100) = 0.46, the lowest
    assert torch.equal(eval_cub.border_rule(clusters), clusters == 3)


def test_object_separating_features_segment_the_object():
    # the clustering path end to end on an oracle feature map: superpixels of a picture of a
    # disc, features that are the disc's one-hot: K=2 must find it at the mask's resolution
    size = 64
    yy, xx = np.mgrid[:size, :size]
    gt = (yy - 30) ** 2 + (xx - 34) ** 2 < 14 ** 2
    image = np.where(gt[..., None], [200, 40, 40], [40, 160, 60]).astype(np.uint8)
    superpixels = torch.from_numpy(r2o.superpixel_map(image, 30, size // 4))
    onehot = torch.stack([torch.from_numpy(~gt), torch.from_numpy(gt)]).float()
    features = F.avg_pool2d(onehot[None], 8)[0]         # 2 x 8 x 8, four superpixel cells each
    big_gt = torch.from_numpy(np.kron(gt, np.ones((3, 2), bool)))    # a non-square mask
    for seed in range(4):                                # any k-means draw finds it
        labels = eval_cub.cluster_regions(features, superpixels, 2, 10,
                                          torch.Generator().manual_seed(seed))
        assert labels.shape == (16, 16)
        clusters = eval_cub.to_resolution(labels, big_gt.shape)
        assert clusters.shape == big_gt.shape
        for fg in (eval_cub.majority_vote(clusters, big_gt), eval_cub.border_rule(clusters)):
            assert eval_cub.iou_metrics(fg, big_gt)['fg_iou'] > 0.8


# ================================ reading CUB ================================

NAMES = ['001.Albatross/Albatross_0001.jpg', '001.Albatross/Albatross_0002.jpg',
         '002.Auklet/Auklet_0001.jpg', '002.Auklet/Auklet_0002.jpg']
SIZES = [(40, 30), (32, 48), (36, 36), (50, 40)]       # (width, height)
TRAIN = [1, 0, 0, 1]                                   # images 2 and 3 form the test split


def make_cub(root, segmentations_beside=False):
    """A tiny CUB_200_2011 folder: 4 images (number 3 grayscale) with soft masks whose rings
    hold exactly 128 (foreground) and 127 (background)."""
    cub = root / 'CUB_200_2011'
    seg = (root if segmentations_beside else cub) / 'segmentations'
    rng = np.random.default_rng(0)
    for i, (name, (w, h)) in enumerate(zip(NAMES, SIZES)):
        (cub / 'images' / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).convert('L') if i == 2 else Image.fromarray(pixels)
        img.save(cub / 'images' / name)
        mask = np.zeros((h, w), np.uint8)
        mask[4:-4, 4:-4] = 127
        mask[5:-5, 5:-5] = 128
        mask[8:-8, 8:-8] = 255
        (seg / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save((seg / name).with_suffix('.png'))
    (cub / 'images.txt').write_text(''.join(f'{i + 1} {n}\n' for i, n in enumerate(NAMES)))
    (cub / 'train_test_split.txt').write_text(''.join(f'{i + 1} {t}\n' for i, t in enumerate(TRAIN)))
    return cub


def test_cub_reader_splits_masks_and_grayscale(tmp_path):
    cub = make_cub(tmp_path)
    assert [item[0] for item in eval_cub.read_cub(cub, 'test')] == [2, 3]
    assert [item[0] for item in eval_cub.read_cub(tmp_path, 'all')] == [1, 2, 3, 4]  # parent folder
    (tmp_path / 'ids.txt').write_text('4\n1\n')
    items = eval_cub.read_cub(cub, str(tmp_path / 'ids.txt'))
    assert [item[0] for item in items] == [1, 4]

    mask = eval_cub.load_mask(items[0][2])
    w, h = SIZES[0]
    assert mask.shape == (h, w)
    assert mask[5, 5] and not mask[4, 4]                # 128 is foreground, 127 is not
    assert mask.sum() == (h - 10) * (w - 10)

    dataset = eval_cub.CUBSet(eval_cub.read_cub(cub, 'test'), input_size=32, n_segments=10)
    gray = dataset[1]                                   # image 3, grayscale on disk
    assert gray['image'].shape == (32, 32, 3) and gray['input'].shape == (3, 32, 32)
    assert gray['superpixels'].shape == (8, 8)
    assert gray['gt'].shape == (SIZES[2][1], SIZES[2][0])


def test_cub_segmentations_beside_the_folder(tmp_path):
    cub = make_cub(tmp_path, segmentations_beside=True)
    items = eval_cub.read_cub(cub, 'test')
    assert items[0][2] == tmp_path / 'segmentations' / Path(NAMES[1]).with_suffix('.png')


def test_cub_missing_segmentations_is_one_clear_error(tmp_path):
    cub = make_cub(tmp_path)
    (cub / 'segmentations').rename(tmp_path / 'elsewhere')
    with pytest.raises(data.DataError) as e:
        eval_cub.read_cub(cub, 'test')
    message = str(e.value)
    assert 'segmentations' in message
    assert str(cub / 'segmentations') in message and str(tmp_path / 'segmentations') in message
    # and from the command line: one line on stderr, exit status 2
    out = subprocess.run([sys.executable, 'eval_cub.py', '--colour-baseline', '--data', str(cub)],
                         cwd=Path(__file__).parent, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith('error: ') and 'segmentations' in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cub_missing_image_file_is_reported(tmp_path):
    cub = make_cub(tmp_path)
    (cub / 'images' / NAMES[2]).unlink()
    with pytest.raises(data.DataError, match='Auklet_0001.jpg'):
        eval_cub.read_cub(cub, 'test')


# ================================ encoders ================================

def fake_checkpoint(path):
    model = r2o.build_model('resnet18', hidden_dim=64, out_dim=32)
    with torch.no_grad():
        model.target_encoder.conv1.weight.add_(1.0)     # make the two encoders differ
    torch.save({'model': model.state_dict(), 'args': {'arch': 'resnet18', 'image_size': 64},
                'epoch': 1, 'step': 1}, path)
    return model


def test_load_encoder_from_checkpoint_and_backbone(tmp_path):
    model = fake_checkpoint(tmp_path / 'checkpoint.pt')
    for which, expected in (('online', model.encoder), ('target', model.target_encoder)):
        net, info = eval_cub.load_encoder(tmp_path / 'checkpoint.pt', encoder=which)
        assert torch.equal(net.conv1.weight, expected.conv1.weight)
        assert info['arch'] == 'resnet18' and info['encoder'] == which and not net.training
    torch.save(r2o.build_encoder('resnet18').state_dict(), tmp_path / 'backbone.pt')
    net, info = eval_cub.load_encoder(tmp_path / 'backbone.pt')
    assert info == dict(kind='backbone', encoder=None, path=str(tmp_path / 'backbone.pt'),
                        arch='resnet18')


@pytest.mark.parametrize('arch', ['resnet34', 'resnet50', 'resnet101'])
def test_arch_is_read_from_the_weights(arch):
    state = getattr(torchvision.models, arch)().state_dict()
    assert eval_cub.infer_arch(state) == arch


def test_a_file_that_is_not_ours_is_one_clear_error(tmp_path):
    not_ours = 'not a ResNet checkpoint in any known layout'
    (tmp_path / 'notes.pt').write_text('hello')
    torch.save({'weights': torch.zeros(3)}, tmp_path / 'other.pt')
    torch.save([torch.zeros(3)], tmp_path / 'list.pt')
    for name in ('notes.pt', 'other.pt', 'list.pt'):
        with pytest.raises(data.DataError, match=not_ours):
            eval_cub.load_encoder(tmp_path / name)
    with pytest.raises(data.DataError, match='no such file'):
        eval_cub.load_encoder(tmp_path / 'absent.pt')


def test_exactly_one_encoder_choice():
    parser = eval_cub.get_args_parser()
    for argv in ([], ['ckpt.pt', '--random-init'], ['--random-init', '--colour-baseline']):
        with pytest.raises(data.DataError, match='exactly one'):
            eval_cub.resolve_args(parser.parse_args(argv))


# ================================ end to end ================================

def test_end_to_end_on_builtin_images(tmp_path):
    fake_checkpoint(tmp_path / 'checkpoint.pt')
    out = tmp_path / 'results.json'
    run_eval(tmp_path / 'checkpoint.pt', '--limit', 3, '--batch-size', 2, '--input-size', 64,
             '--out', out, '--save-vis', tmp_path / 'vis', '--vis-count', 2)
    results = json.loads(out.read_text())
    assert results['n_images'] == 3
    assert results['encoder']['kind'] == 'checkpoint' and results['encoder']['arch'] == 'resnet18'
    assert results['data']['set'] == 'builtin'
    p = results['protocol']
    assert (p['input_size'], p['features'], p['regions'], p['k']) == (64, 'layer3', 'superpixels', 5)
    assert p['superpixels'] == dict(n_segments=24, compactness=30.0, sigma=1.0, computed_at=64,
                                    stored_at=16)
    for rule in ('majority', 'label_free'):
        m = results['metrics'][rule]
        assert 0 <= m['fg_iou'] <= 1 and 0 <= m['bg_iou'] <= 1
        assert m['miou'] == pytest.approx((m['fg_iou'] + m['bg_iou']) / 2)
    assert (tmp_path / 'vis' / 'vis-000.png').is_file()


def test_colour_baseline_on_a_cub_folder_and_batch_independence(tmp_path):
    make_cub(tmp_path)
    results = [run_eval('--colour-baseline', '--data', tmp_path, '--input-size', 32,
                        '--superpixels', 10, '--batch-size', b, '--out', tmp_path / f'{b}.json')
               for b in (1, 2)]
    assert results[0]['data']['split'] == 'test' and results[0]['n_images'] == 2
    assert results[0]['encoder'] == dict(kind='colour-baseline')
    assert results[0]['metrics'] == results[1]['metrics']      # k-means seeded per image


def test_grid_regions_with_random_init_layer4(tmp_path):
    results = run_eval('--random-init', '--limit', 2, '--input-size', 64, '--layer', 'layer4',
                       '--regions', 'grid', '--k', 3, '--out', tmp_path / 'r.json')
    assert results['encoder'] == dict(kind='random-init', arch='resnet18', seed=0)
    assert results['protocol']['feature_grid'] == 2 and results['protocol']['superpixels'] is None
    assert results['n_images'] == 2


# ================================ --split files ================================

def test_cub_split_file_of_ids_or_in_the_train_test_split_layout(tmp_path):
    cub = make_cub(tmp_path)
    (tmp_path / 'ids.txt').write_text('# chosen birds\n4\n\n1\n')
    assert [item[0] for item in eval_cub.read_cub(cub, str(tmp_path / 'ids.txt'))] == [1, 4]
    # "<id> <flag>" as in train_test_split.txt (1 train, 0 test): the 0-flag images, not all of them
    (tmp_path / 'flags.txt').write_text('1 0\n2 1\n3 0\n4 1\n')
    assert [item[0] for item in eval_cub.read_cub(cub, str(tmp_path / 'flags.txt'))] == [1, 3]
    official = cub / 'train_test_split.txt'
    assert ([item[0] for item in eval_cub.read_cub(cub, str(official))]
            == [item[0] for item in eval_cub.read_cub(cub, 'test')])
    for text, line in (('1 0 7\n', "line 1 '1 0 7'"), ('1 0\n2 2\n', "line 2 '2 2'"),
                       ('1\n2 0\n', "line 2 '2 0'"), ('1\nbird\n', "line 2 'bird'")):
        (tmp_path / 'bad.txt').write_text(text)
        with pytest.raises(data.DataError, match=line) as e:
            eval_cub.read_cub(cub, str(tmp_path / 'bad.txt'))
        assert '\n' not in str(e.value)


# ================================ weights in other layouts ================================

AUTHORS_CHILD = {'conv1': '0', 'bn1': '1', 'layer1': '4', 'layer2': '5', 'layer3': '6', 'layer4': '7'}
D2_STAGE = {'layer1': 'res2', 'layer2': 'res3', 'layer3': 'res4', 'layer4': 'res5'}
D2_MODULE = {'bn1': 'conv1.norm', 'bn2': 'conv2.norm', 'bn3': 'conv3.norm',
             'downsample.0': 'shortcut', 'downsample.1': 'shortcut.norm'}


def authors_name(name, network='online'):
    """The R2O authors' key for a torchvision ResNet key: their encoder is nn.Sequential of
    torchvision's children (0 conv1, 1 bn1, 4-7 layer1-4) inside a DDP-wrapped model."""
    top, rest = name.split('.', 1)
    return f'module.{network}_network.encoder.{AUTHORS_CHILD[top]}.{rest}'


def d2_name(name):
    """detectron2's key for a torchvision ResNet key, as tools/convert-torchvision-to-d2.py
    names them ('layer2.0.bn1.weight' -> 'res3.0.conv1.norm.weight'; fc -> 'stem.fc')."""
    parts = name.split('.')
    head, parts = ([D2_STAGE[parts[0]], parts[1]], parts[2:]) if parts[0] in D2_STAGE else (['stem'], parts)
    module, leaf = '.'.join(parts[:-1]), parts[-1]
    return '.'.join(head + [D2_MODULE.get(module, module), leaf])


@pytest.fixture(scope='module')
def resnet50_weights():
    """One resnet50 with random weights and BN statistics far from their defaults (so a
    misplaced or missing BN buffer shows), as a torchvision state_dict with fc; and a different
    one standing for the EMA target."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    online = {k: v.clone() for k, v in net.state_dict().items()}
    target = {k: v * 1.01 if v.is_floating_point() else v for k, v in online.items()}
    return online, target


def features_of(state):
    """layer3 features of a 1 x 3 x 64 x 64 fixed input through a torchvision ResNet-50 with `state`."""
    net = r2o.build_encoder('resnet50')
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith('fc.')})
    return layer3_features(net.eval())


def layer3_features(net):
    x = torch.linspace(-2, 2, 3 * 64 * 64).view(1, 3, 64, 64)
    with torch.no_grad():
        return r2o.encoder_features(net, x, 'layer3')


def save_layouts(folder, online, target):
    """The same encoder in every layout eval_cub reads; returns {file name: expected kind}."""
    no_fc = {k: v for k, v in online.items() if not k.startswith('fc.')}
    torch.save(no_fc, folder / 'backbone.pt')                                       # ours
    model = {authors_name(k): v for k, v in no_fc.items()}
    model.update({authors_name(k, 'target'): v for k, v in target.items() if not k.startswith('fc.')})
    model.update({'module.online_network.projetion.l1.weight': torch.randn(16, 2048),
                  'module.target_network.projetion.l1.weight': torch.randn(16, 2048),
                  'module.predictor.predictor.l1.weight': torch.randn(16, 16)})
    authors = dict(config={'model': {'backbone': {'type': 'resnet50'}}}, epoch=300, steps=9,
                   model=model, optimizer={'state': {}, 'param_groups': []}, amp={})
    torch.save(authors, folder / 'r2o_checkpoint.pth.tar')
    authors['model'] = {k.removeprefix('module.'): v for k, v in model.items()}     # no DDP
    torch.save(authors, folder / 'r2o_checkpoint_single_gpu.pth')
    torch.save({'module.' + k: v for k, v in online.items()}, folder / 'torchvision.pth')
    d2 = {'model': {d2_name(k): v.numpy() for k, v in online.items()},
          '__author__': 'torchvision', 'matching_heuristics': True}
    for protocol in (2, 4, 5):
        with open(folder / f'model_final_p{protocol}.pkl', 'wb') as f:
            pickle.dump(d2, f, protocol=protocol)
    # a whole detector: the ResNet under backbone.bottom_up., beside an FPN and heads
    detector = {'backbone.bottom_up.' + k: v for k, v in d2['model'].items()}
    detector['backbone.fpn_lateral2.weight'] = np.zeros((256, 256, 1, 1), np.float32)
    detector['roi_heads.box_predictor.cls_score.weight'] = np.zeros((81, 1024), np.float32)
    with open(folder / 'detector.pkl', 'wb') as f:
        pickle.dump({'model': detector, '__author__': 'Detectron2'}, f)
    return {'backbone.pt': 'backbone', 'r2o_checkpoint.pth.tar': 'authors-checkpoint',
            'r2o_checkpoint_single_gpu.pth': 'authors-checkpoint', 'torchvision.pth': 'backbone',
            'model_final_p2.pkl': 'detectron2', 'model_final_p4.pkl': 'detectron2',
            'model_final_p5.pkl': 'detectron2', 'detector.pkl': 'detectron2'}


def test_every_layout_gives_the_same_encoder(tmp_path, resnet50_weights):
    online, target = resnet50_weights
    expected = features_of(online)
    for name, kind in save_layouts(tmp_path, online, target).items():
        net, info = eval_cub.load_encoder(tmp_path / name)
        assert (info['kind'], info['arch'], net.training) == (kind, 'resnet50', False), name
        assert isinstance(net.fc, torch.nn.Identity)
        assert torch.equal(layer3_features(net), expected), name
        assert torch.equal(net.bn1.running_var, online['bn1.running_var']), name


def test_encoder_target_reads_the_authors_ema_network(tmp_path, resnet50_weights):
    online, target = resnet50_weights
    save_layouts(tmp_path, online, target)
    net, info = eval_cub.load_encoder(tmp_path / 'r2o_checkpoint.pth.tar', encoder='target')
    assert (info['kind'], info['encoder'], info['epoch']) == ('authors-checkpoint', 'target', 300)
    assert torch.equal(layer3_features(net), features_of(target))
    assert not torch.equal(layer3_features(net), features_of(online))
    _, info = eval_cub.load_encoder(tmp_path / 'r2o_checkpoint.pth.tar')
    assert info['encoder'] == 'online'
    for name in ('torchvision.pth', 'model_final_p4.pkl'):     # one network: nothing to choose
        with pytest.raises(data.DataError, match='--encoder applies to a training checkpoint'):
            eval_cub.load_encoder(tmp_path / name, encoder='target')


def test_load_of_an_unknown_file_is_one_line_saying_what_it_holds(tmp_path):
    torch.save({'alpha': torch.zeros(2), 'beta': torch.zeros(3), 'gamma': torch.zeros(1)},
               tmp_path / 'tensors.pt')
    with open(tmp_path / 'other_d2.pkl', 'wb') as f:           # d2's wrapping, not its names
        pickle.dump({'model': {'trunk.first.weight': np.zeros((4, 3), np.float32)},
                     '__author__': 'someone'}, f)
    (tmp_path / 'list.pkl').write_bytes(pickle.dumps([1, 2, 3]))
    for name, found in (('tensors.pt', 'holds a dict with keys alpha, beta, gamma'),
                        ('other_d2.pkl', "its 'model' is a dict with keys trunk.first.weight"),
                        ('list.pkl', 'holds a list')):
        with pytest.raises(data.DataError) as e:
            eval_cub.load_encoder(tmp_path / name)
        message = str(e.value)
        assert found in message and 'not a ResNet checkpoint in any known layout' in message
        assert 'detectron2' in message and "the authors' R2O checkpoint" in message
        assert '\n' not in message


class RunsAShellCommand:
    """Unpickling this object runs a shell command (the marker file shows whether it ran)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'echo pwned > {self.marker}',)


def test_load_refuses_a_pickle_carrying_code_before_it_runs(tmp_path):
    marker = tmp_path / 'marker'
    payload = {'model': {'stem.conv1.weight': RunsAShellCommand(marker)}}
    with open(tmp_path / 'model_final.pkl', 'wb') as f:
        pickle.dump(payload, f)
    torch.save(payload, tmp_path / 'checkpoint.pth')                      # torch's zip format
    torch.save(payload, tmp_path / 'old.pth', _use_new_zipfile_serialization=False)
    for name in ('model_final.pkl', 'checkpoint.pth', 'old.pth'):
        with pytest.raises(data.DataError, match='carries code or objects other than') as e:
            eval_cub.load_encoder(tmp_path / name)
        assert 'system' in str(e.value) and '\n' not in str(e.value)
    out = run_cli('eval_cub.py', tmp_path / 'model_final.pkl', '--limit', '1')
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert 'was not loaded' in out.stderr
    assert not marker.exists()


# ================================ eval_cub.py --download: CUB and weights by URL ================================

def make_cub_archives(folder, escaping=False):
    """make_cub's tiny CUB as Caltech's two archives, in `folder`: CUB_200_2011.tgz
    (CUB_200_2011/ beside attributes.txt) and segmentations.tgz (segmentations/). escaping: the
    CUB archive ends with a member '../evil.txt' (a tar path traversal). Returns folder."""
    source = folder / 'source'
    make_cub(source, segmentations_beside=True)
    (source / 'attributes.txt').write_text('1 has_bill_shape::curved\n')
    with tarfile.open(folder / 'CUB_200_2011.tgz', 'w:gz') as tar:
        tar.add(source / 'CUB_200_2011', 'CUB_200_2011')
        tar.add(source / 'attributes.txt', 'attributes.txt')
        if escaping:
            evil = tarfile.TarInfo('../evil.txt')
            evil.size = 5
            tar.addfile(evil, io.BytesIO(b'pwned'))
    with tarfile.open(folder / 'segmentations.tgz', 'w:gz') as tar:
        tar.add(source / 'segmentations', 'segmentations')
    shutil.rmtree(source)
    return folder


def listing(folder):
    """Every path under `folder` (itself included) with the size of each file, to compare a folder
    before and after a run; [] when it does not exist."""
    paths = [folder, *folder.rglob('*')] if folder.exists() else []
    return sorted((str(p.relative_to(folder.parent)), p.stat().st_size if p.is_file() else None)
                  for p in paths)


def count_downloads(monkeypatch):
    """A list that eval_cub.download appends each URL it is asked for to."""
    urls, real = [], eval_cub.download
    monkeypatch.setattr(eval_cub, 'download',
                        lambda url, path, **kw: urls.append(url) or real(url, path, **kw))
    return urls


def test_download_fetches_checks_unpacks_and_evaluates_then_never_again(tmp_path, monkeypatch):
    mirror = make_cub_archives(tmp_path / 'mirror')
    monkeypatch.delenv(eval_cub.CUB_MIRROR_VARIABLE, raising=False)
    for facts in eval_cub.CUB_ARCHIVES.values():
        monkeypatch.setitem(facts, 'url', (mirror / facts['file']).as_uri())
    urls = count_downloads(monkeypatch)
    root = tmp_path / 'datasets'
    root.mkdir()
    (root / 'CUB_200_2011.tgz.part').write_bytes(b'left by a killed run')   # restarted, not kept
    argv = ('--random-init', '--arch', 'resnet18', '--input-size', 64, '--data', root,
            '--out', tmp_path / 'r.json')
    first = run_eval(*argv, '--download')
    assert sorted(urls) == sorted(f['url'] for f in eval_cub.CUB_ARCHIVES.values())
    assert first['n_images'] == 2 and first['data']['set'] == 'CUB-200-2011'
    # PATH/CUB_200_2011/ with segmentations/ inside; archives, .part and temporary folders gone
    assert sorted(os.listdir(root)) == ['CUB_200_2011', 'attributes.txt']
    assert sorted(os.listdir(root / 'CUB_200_2011')) == ['images', 'images.txt', 'segmentations',
                                                         'train_test_split.txt']
    again = run_eval(*argv, '--download')
    assert len(urls) == 2                                   # found: nothing downloaded again
    without = run_eval(*argv)                               # and found without --download
    assert first['metrics'] == again['metrics'] == without['metrics']


@pytest.mark.parametrize('fault', ['damaged', 'truncated', 'escaping'])
def test_download_refuses_a_bad_archive_in_one_line_leaving_the_folder_as_it_was(tmp_path, fault):
    mirror = make_cub_archives(tmp_path / 'mirror', escaping=fault == 'escaping')
    if fault == 'damaged':                                  # bytes flipped in the middle
        path = mirror / 'segmentations.tgz'
        raw = bytearray(path.read_bytes())
        middle = len(raw) // 2
        raw[middle:middle + 8] = bytes(b ^ 0xFF for b in raw[middle:middle + 8])
        path.write_bytes(raw)
    if fault == 'truncated':                                # the transfer ended early
        path = mirror / 'CUB_200_2011.tgz'
        path.write_bytes(path.read_bytes()[:path.stat().st_size * 2 // 3])
    root = tmp_path / 'datasets'
    if fault != 'truncated':                          # a folder that exists; or one that does not
        root.mkdir()
        (root / 'notes.txt').write_text('mine')
    before = listing(root)
    out = run_cli('eval_cub.py', '--colour-baseline', '--data', root, '--download',
                  env={**cli_env(), eval_cub.CUB_MIRROR_VARIABLE: mirror.as_uri()})
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith('error: ')
    bad = 'segmentations.tgz' if fault == 'damaged' else 'CUB_200_2011.tgz'
    assert bad in out.stderr
    expected = dict(damaged='damaged', truncated='damaged',
                    escaping="refused, '../evil.txt' would be extracted to")[fault]
    assert expected in out.stderr
    assert listing(root) == before
    assert not (tmp_path / 'evil.txt').exists()


def tgz_with(path, *members):
    """A .tgz of 'good.txt' followed by `members`: (name, kind, link target) with kind 'file',
    'symlink', 'hardlink' or 'device' (a character device)."""
    with tarfile.open(path, 'w:gz') as tar:
        for name, kind, target in (('good.txt', 'file', None), *members):
            info = tarfile.TarInfo(name)
            info.type = dict(file=tarfile.REGTYPE, symlink=tarfile.SYMTYPE,
                             hardlink=tarfile.LNKTYPE, device=tarfile.CHRTYPE)[kind]
            info.linkname = target or ''
            body = b'data' if kind == 'file' else b''
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


@pytest.mark.parametrize('member, problem', [
    (('/tmp/evil.txt', 'file', None), 'has an absolute path'),
    (('../evil.txt', 'file', None), 'would be extracted to .*outside the destination'),
    (('a/../../evil.txt', 'file', None), 'would be extracted to .*outside the destination'),
    (('link', 'symlink', '/etc/passwd'), 'is a link to an absolute path'),
    (('a/link', 'symlink', '../../evil.txt'), 'would link to .*outside the destination'),
    (('hard', 'hardlink', '../evil.txt'), 'would link to .*outside the destination'),
    (('dev', 'device', None), 'is a special file'),
])
def test_download_refuses_tar_members_escaping_the_folder_before_writing_anything(
        tmp_path, member, problem):
    archive = tgz_with(tmp_path / 'bad.tgz', member)
    dest = tmp_path / 'dest'
    dest.mkdir()
    facts = dict(members=('good.txt',))
    if member[1] in ('symlink', 'hardlink') and not eval_cub.tar_links_safe():
        problem = 'is a link'                # this Python's filter is not trusted with links
    for step in (lambda: eval_cub.check_archive(archive, facts, dest),
                 lambda: eval_cub.safe_extract(archive, dest)):
        with pytest.raises(data.DataError, match=f'refused, .*{re.escape(repr(member[0]))} '
                                                 f'{problem}.*nothing was unpacked'):
            step()
    assert os.listdir(dest) == []                         # not even good.txt, which came first
    assert sorted(os.listdir(tmp_path)) == ['bad.tgz', 'dest']
    # a link that stays inside is fine where the filter judges links safely; refused elsewhere
    archive = tgz_with(tmp_path / 'ok.tgz', ('a/link', 'symlink', '../good.txt'))
    if eval_cub.tar_links_safe():
        eval_cub.check_archive(archive, facts, dest)
        assert eval_cub.safe_extract(archive, dest) == ['a', 'good.txt']
        assert (dest / 'a' / 'link').read_bytes() == b'data'
    else:
        with pytest.raises(data.DataError, match="'a/link' is a link.*nothing was unpacked"):
            eval_cub.check_archive(archive, facts, dest)
        assert os.listdir(dest) == []
    assert not eval_cub.tar_links_safe((3, 11, 7)) and not eval_cub.tar_links_safe((3, 10, 12))
    assert eval_cub.tar_links_safe((3, 11, 13)) and eval_cub.tar_links_safe((3, 14, 0))


def test_download_refuses_a_link_leading_out_through_a_link_unpacked_before_it(tmp_path):
    """'a' -> '.' then 'a/b' -> '..': by their names both stay inside, but once 'a' is unpacked,
    'a/b' points out of the folder. Python's filter refuses it as it unpacks, and nothing is kept."""
    archive = tgz_with(tmp_path / 'bad.tgz', ('a', 'symlink', '.'), ('a/b', 'symlink', '..'),
                       ('a/b/evil.txt', 'file', None))
    dest = tmp_path / 'dest'
    dest.mkdir()
    problem = ("'a/b' would link to .*outside the destination" if eval_cub.tar_links_safe() else
               "'a' is a link")              # this Python's filter is not trusted with links
    with pytest.raises(data.DataError, match=f'refused, {problem}.*nothing was unpacked'):
        eval_cub.safe_extract(archive, dest)
    assert os.listdir(dest) == [] and sorted(os.listdir(tmp_path)) == ['bad.tgz', 'dest']


def test_download_on_a_python_without_tar_filters_is_one_line_naming_the_version(
        tmp_path, monkeypatch):
    urls = count_downloads(monkeypatch)
    monkeypatch.setenv(eval_cub.CUB_MIRROR_VARIABLE, str(tmp_path / 'mirror'))   # never the network
    monkeypatch.delattr(tarfile, 'data_filter')
    root = tmp_path / 'datasets'
    with pytest.raises(data.DataError, match=r"--download needs Python 3\.10\.12\+, 3\.11\.4\+ or "
                                             r"3\.12\+ \(tarfile's filter='data'"):
        eval_cub.fetch_cub(root)
    assert urls == [] and not root.exists()


def test_a_missing_cub_without_download_is_one_line_giving_the_command(tmp_path):
    absent = tmp_path / 'datasets'
    out = run_cli('eval_cub.py', '--colour-baseline', '--data', absent)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert f'run: python eval_cub.py --colour-baseline --data {absent} --download' in out.stderr
    assert not absent.exists()
    cub = make_cub(tmp_path)                              # a CUB without segmentations/
    shutil.rmtree(cub / 'segmentations')
    with pytest.raises(data.DataError, match='missing: segmentations') as e:
        run_eval('--colour-baseline', '--data', tmp_path)
    assert f'run: python eval_cub.py --colour-baseline --data {tmp_path} --download' in str(e.value)


class FakeResponse(io.BytesIO):
    """What urllib.request.urlopen answers: a body, a status and headers."""

    def __init__(self, body, status=200, headers=None):
        super().__init__(body)
        self.status, self.headers = status, headers or {}


def test_an_interrupted_download_resumes_and_a_truncated_one_is_never_kept(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 40
    ranges = []

    def urlopen(request, timeout=None):
        """The first answer ends after 3000 bytes though it announces them all; later ones send
        the rest of a Range request (206)."""
        ranges.append(request.get_header('Range'))
        if len(ranges) == 1:
            return FakeResponse(payload[:3000], headers={'Content-Length': str(len(payload))})
        start = int(re.fullmatch(r'bytes=(\d+)-', ranges[-1])[1])
        return FakeResponse(payload[start:], 206, {
            'Content-Length': str(len(payload) - start),
            'Content-Range': f'bytes {start}-{len(payload) - 1}/{len(payload)}'})

    monkeypatch.setattr(urllib.request, 'urlopen', urlopen)
    url, target = 'https://example.org/CUB_200_2011.tgz', tmp_path / 'CUB_200_2011.tgz'
    with pytest.raises(data.DataError, match='stopped at 3,000 of 10,240 bytes') as e:
        eval_cub.download(url, target)
    assert 'resume' in str(e.value) and '\n' not in str(e.value)
    assert os.listdir(tmp_path) == ['CUB_200_2011.tgz.part']
    eval_cub.download(url, target)
    assert ranges == [None, 'bytes=3000-']
    assert target.read_bytes() == payload and os.listdir(tmp_path) == ['CUB_200_2011.tgz']
    # weights (resume=False): a truncated transfer leaves nothing in the cache
    ranges.clear()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    with pytest.raises(data.DataError, match='stopped at 3,000'):
        eval_cub.cached_weights('https://example.org/r2o_resnet50.pth')
    assert os.listdir(tmp_path / 'torch' / 'hub' / 'checkpoints') == []


def test_weights_by_url_are_downloaded_once_into_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    fake_checkpoint(tmp_path / 'checkpoint.pt')
    url = (tmp_path / 'checkpoint.pt').as_uri()
    urls = count_downloads(monkeypatch)
    for _ in range(2):
        results = run_eval(url, '--limit', 1, '--input-size', 64, '--out', tmp_path / 'r.json')
    assert urls == [url]
    cached = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'checkpoint.pt'
    assert os.listdir(cached.parent) == ['checkpoint.pt']
    assert cached.read_bytes() == (tmp_path / 'checkpoint.pt').read_bytes()
    assert results['encoder']['url'] == url and results['encoder']['path'] == str(cached)
    assert results['encoder']['kind'] == 'checkpoint' and results['n_images'] == 1


def test_weights_by_url_failures_and_code_are_one_line(tmp_path):
    env = {**cli_env(), 'TORCH_HOME': str(tmp_path / 'torch')}
    checkpoints = tmp_path / 'torch' / 'hub' / 'checkpoints'
    out = run_cli('eval_cub.py', (tmp_path / 'absent.pth').as_uri(), '--limit', '1', env=env)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert 'absent.pth: download failed' in out.stderr
    assert os.listdir(checkpoints) == []                  # nothing half-written in the cache
    marker = tmp_path / 'marker'
    torch.save({'model': {'stem.conv1.weight': RunsAShellCommand(marker)}}, tmp_path / 'code.pth')
    out = run_cli('eval_cub.py', (tmp_path / 'code.pth').as_uri(), '--limit', '1', env=env)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert 'carries code or objects other than weights' in out.stderr
    assert not marker.exists()


# ================================ copying the method out ================================
#
# Every function and class of r2o.py's method section runs when copied out alone: its source,
# the sources of the names its docstring lists after "Uses:", and r2o.py's imports (not the
# project's own data module), executed in a fresh namespace, compute what r2o's own does.

def method_section():
    """{name: ast node} of r2o.py's method section, the import statements, and the source."""
    source = Path(r2o.__file__).read_text()
    first = source[:source.index('# ================================ the method')].count('\n')
    last = source[:source.index('# ================================ speed and bookkeeping')].count('\n')
    tree = ast.parse(source)
    defs, imports = {}, []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if not any(a.name == 'data' for a in node.names):
                imports.append(ast.get_source_segment(source, node))
        elif first < node.lineno < last:
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     [t.id for t in node.targets if isinstance(t, ast.Name)])
            for name in names:
                defs[name] = node
    return defs, imports, source


def docstring_uses(node):
    """The names a definition's docstring lists after "Uses:" (a constant has none)."""
    if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return set()
    doc = ast.get_docstring(node) or ''
    found = re.search(r'Uses: ([\w,\s]+)\.', doc)
    return set(re.findall(r'\w+', found[1])) if found else set()


def copied_out(name):
    """A fresh namespace holding r2o's imports, `name` and what its docstring says it uses."""
    defs, imports, source = method_section()
    needed = docstring_uses(defs[name]) | {name}
    namespace = {}
    exec('\n'.join(imports), namespace)
    for node in sorted({defs[n] for n in needed}, key=lambda n: n.lineno):   # file order
        start = node.decorator_list[0].lineno if getattr(node, 'decorator_list', None) else node.lineno
        exec('\n'.join(source.splitlines()[start - 1:node.end_lineno]), namespace)
    return namespace


def seeded(fn):
    """Call fn with the global random state reset, so two calls draw the same numbers."""
    torch.manual_seed(0)
    return fn()


def small_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        features=torch.randn(2, 6, 4, 4, generator=g),
        superpixels=torch.randint(0, 9, (2, 16, 16), generator=g),
        labels=torch.randint(0, 3, (2, 16, 16), generator=g),
        boxes=torch.tensor([[[0.1, 0.2, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0]],
                            [[0.3, 0.1, 0.9, 0.6], [0.2, 0.2, 0.8, 0.8]]]),
        flips=torch.tensor([[True, False], [False, True]]),
        masks=torch.rand(2, 3, 4, generator=g),
        rows=torch.randn(4, 2, 3, 8, generator=g).unbind(),
        x=torch.randn(50, 8, generator=g),
        image=np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def call_method(name, ns):
    """`name` from namespace ns called on small random inputs (the same for every namespace)."""
    i = small_inputs()
    encoder = lambda: seeded(lambda: r2o.build_encoder('resnet18')).eval()
    small_r2o = lambda: seeded(lambda: ns['R2O'](r2o.build_encoder('resnet18'), 16, 8))
    calls = {
        'CLUSTER_LAYER': lambda: ns['CLUSTER_LAYER'], 'POOL_LAYER': lambda: ns['POOL_LAYER'],
        'STRIDE': lambda: ns['STRIDE'], 'VIT_POOL_LAYER': lambda: ns['VIT_POOL_LAYER'],
        'VIT_CLUSTER_FROM_END': lambda: ns['VIT_CLUSTER_FROM_END'],
        'VIT_ARCHS': lambda: ns['VIT_ARCHS'],
        'build_encoder': lambda: [seeded(lambda: ns['build_encoder']('resnet18')).state_dict(),
                                  {k: v.shape for k, v in seeded(lambda: ns['build_encoder'](
                                      'vit_s_16', 32)).state_dict().items()}],
        'feature_maps': lambda: [ns['feature_maps'](encoder()), ns['feature_maps'](tiny_vit())],
        'vit_tokens': lambda: ns['vit_tokens'](tiny_vit(), torch.ones(1, 3, 48, 48), 'block1'),
        'encoder_features': lambda: [
            ns['encoder_features'](encoder(), torch.ones(1, 3, 64, 64), 'layer3'),
            ns['encoder_features'](tiny_vit(), torch.ones(1, 3, 64, 64), 'norm')],
        'feature_dim': lambda: [ns['feature_dim'](encoder(), 'layer4'),
                                ns['feature_dim'](tiny_vit(), 'norm')],
        'mlp': lambda: seeded(lambda: ns['mlp'](8, 16, 4))(i['x']),
        'downsample_labels': lambda: torch.from_numpy(ns['downsample_labels'](i['superpixels'][0].numpy(), 5)),
        'superpixel_map': lambda: torch.from_numpy(ns['superpixel_map'](i['image'], 12, 8)),
        'superpixel_pool': lambda: ns['superpixel_pool'](i['features'], i['superpixels']),
        'squared_distances': lambda: ns['squared_distances'](i['x'], i['x'][:5]),
        'kmeans_seeds': lambda: ns['kmeans_seeds'](i['x'], 6, torch.Generator().manual_seed(1)),
        'kmeans': lambda: ns['kmeans'](i['x'], 6, 5, torch.Generator().manual_seed(1)),
        'refine': lambda: ns['refine'](i['features'], i['superpixels'], 3, 5,
                                       torch.Generator().manual_seed(1), group=1),
        'view_masks': lambda: ns['view_masks'](i['labels'], i['boxes'][:, 0], i['flips'][:, 0], 3, 2),
        'masks_for_batch': lambda: [ns['masks_for_batch'](
            net, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)),
            i['superpixels'], i['boxes'], i['flips'], 3, 5, torch.Generator().manual_seed(1))
            for net in (encoder(), tiny_vit())],
        'mask_pool': lambda: ns['mask_pool'](i['features'][:, :, :2, :2], i['masks']),
        'mask_overlap': lambda: ns['mask_overlap'](i['masks'], i['masks'].flip(0)),
        'mask_loss': lambda: ns['mask_loss'](*i['rows'], i['masks'].sum(-1) > 2, groups=2),
        'heads': lambda: ns['heads'](i['rows'][0], [seeded(lambda: r2o.mlp(8, 16, 4))]),
        'R2O': lambda: [small_r2o()(torch.ones(2, 3, 64, 64), torch.zeros(2, 3, 64, 64),
                                    i['masks'], i['masks'].flip(0)),
                        seeded(lambda: ns['R2O'](tiny_vit(), 16, 8))(
                            torch.ones(2, 3, 64, 64), torch.zeros(2, 3, 64, 64),
                            torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(4)),
                            torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(5)))],
        'k_schedule': lambda: [ns['k_schedule'](e, 300) for e in (1, 150, 300)],
        'learning_rate': lambda: ns['learning_rate'](7, 100, 10, 0.3, 512, 64),
        'ema_momentum': lambda: ns['ema_momentum'](30, 100, 0.99, 256 / 4096),
        'ema_update': lambda: ema_updated(ns['ema_update']),
        'LARS': lambda: lars_stepped(ns['LARS']),
        'weight_decay_schedule': lambda: [ns['weight_decay_schedule'](s, 10) for s in (0, 3, 10)],
        'adamw_param_groups': lambda: [(len(g['params']), g['decay']) for g in
                                       ns['adamw_param_groups'](seeded(lambda: r2o.R2O(tiny_vit(), 16, 8)))],
        'lars_param_groups': lambda: [len(g['params']) for g in ns['lars_param_groups'](
            seeded(lambda: r2o.build_model('resnet18', 16, 8)))],
    }
    return calls[name]()


def ema_updated(ema_update):
    model = seeded(lambda: r2o.build_model('resnet18', 16, 8))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    ema_update(model, 0.9)
    return [p.clone() for p in model.target_encoder.parameters()]


def lars_stepped(lars):
    w = torch.nn.Parameter(torch.arange(12.).view(3, 4))
    b = torch.nn.Parameter(torch.ones(3))
    opt = lars([dict(params=[w]), dict(params=[b], weight_decay=0.0, lars_exclude=True)], lr=0.5)
    for _ in range(2):
        w.grad, b.grad = torch.ones(3, 4), torch.full((3,), 2.0)
        opt.step()
    return [w.detach().clone(), b.detach().clone()]


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize('name', sorted(method_section()[0]))
def test_each_method_function_copies_out_with_what_its_docstring_names(name):
    defs = method_section()[0]
    node = defs[name]
    # what it reaches in the module, by reading its source, is what its docstring lists
    reached = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & set(defs)
    uses = docstring_uses(node)
    assert reached - {name} <= uses, f'{name} uses {sorted(reached - uses - {name})} unlisted'
    assert uses <= set(defs), f'{name} lists names not in the method section: {uses - set(defs)}'
    for used in uses:                                   # and the list is closed
        assert docstring_uses(defs[used]) <= uses | {used}, f'{name}: {used} needs more'
    namespace = copied_out(name)
    assert_same(call_method(name, namespace), call_method(name, vars(r2o)))


# ================================ the documentation ================================

def markdown_anchors(text):
    """The anchors GitHub gives a markdown file's headings: lower case, every character but letters,
    digits, '_', '-' and spaces dropped, spaces made '-', a repeated anchor numbered -1, -2, ..."""
    anchors, seen, in_code = set(), {}, False
    for line in text.splitlines():
        if line.startswith('```'):
            in_code = not in_code
        heading = None if in_code else re.match(r'#{1,6} (.+)', line)
        if heading:
            slug = re.sub(r'[^\w\- ]', '', heading.group(1).strip().lower()).replace(' ', '-')
            anchors.add(f'{slug}-{seen[slug]}' if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_of_the_readme_and_docs_resolves():
    broken = []
    for md in [HERE / 'README.md', *sorted((HERE / 'docs').glob('*.md'))]:
        for target in re.findall(r'\]\(([^)\s]+)\)', md.read_text()):
            if re.match(r'[a-z]+:', target):   # https:, mailto:
                continue
            path, _, anchor = target.partition('#')
            dest = (md.parent / path) if path else md
            if not dest.is_file():
                broken.append(f'{md.name}: {target} (no such file)')
            elif anchor and anchor not in markdown_anchors(dest.read_text()):
                broken.append(f'{md.name}: {target} (no such heading)')
    assert not broken, '\n'.join(broken)


# ================================ a ViT backbone ================================

TINY_VIT = dict(patch_size=16, num_layers=2, num_heads=2, hidden_dim=128, mlp_dim=256)


def tiny_vit(image_size=64):
    """A 2-block ViT of width 128 (2 heads), as build_encoder makes its ViTs."""
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(image_size, **TINY_VIT)
    net.heads = torch.nn.Identity()
    return net.eval()


def test_vit_patch_tokens_are_torchvision_s_own_and_read_any_input_size():
    net = tiny_vit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps = r2o.feature_maps(net)
    assert maps == dict(cluster='block1', pool='norm', stride=dict(block1=16, block2=16, norm=16))
    with torch.no_grad():
        tokens = net._process_input(x)                          # torchvision's own forward
        tokens = net.encoder(torch.cat([net.class_token.expand(2, -1, -1), tokens], 1))
        ours = r2o.encoder_features(net, x, 'norm')
        assert ours.shape == (2, 128, 4, 4)
        assert torch.allclose(ours.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5)
        assert torch.allclose(net(x), tokens[:, 0], atol=1e-5)   # the class token kept
        # another size: the position embedding interpolated, a 6 x 6 map
        assert r2o.encoder_features(net, torch.randn(1, 3, 96, 96), 'block1').shape == (1, 128, 6, 6)
    assert r2o.feature_dim(net, 'norm') == 128
    with pytest.raises(ValueError, match='block1'):
        r2o.encoder_features(net, x, 'block3')
    # a 12-block ViT clusters block 9
    assert r2o.feature_maps(r2o.build_encoder('vit_s_16', 64))['cluster'] == 'block9'


def test_vit_archs_are_dino_s_vit_s_and_torchvision_s_vit_b():
    with torch.device('meta'):
        small, base = r2o.build_encoder('vit_s_16'), r2o.build_encoder('vit_b_16')
        reference = torchvision.models.vit_b_16()
    assert (small.hidden_dim, len(small.encoder.layers), small.encoder.layers[0].num_heads,
            small.patch_size) == (384, 12, 6, 16)
    assert sum(p.numel() for p in small.parameters()) == 21_665_664     # DINO's ViT-S/16, no head
    reference.heads = torch.nn.Identity()
    assert {k: v.shape for k, v in base.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}


def test_vit_masks_follow_its_grid_and_the_loss_pools_its_last_block():
    net = tiny_vit()
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 3, 64, 64, generator=g)
    superpixels = torch.randint(0, 9, (2, 16, 16), generator=g)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]] * 2] * 2)
    flips = torch.zeros(2, 2, dtype=torch.bool)
    m1, m2, k = r2o.masks_for_batch(net, raw, superpixels, boxes, flips, 3, 5,
                                    torch.Generator().manual_seed(1))
    assert k == 3 and m1.shape == m2.shape == (2, 3, 16)          # a 4 x 4 grid: stride 16
    assert torch.allclose(m1.sum(1), torch.ones(2, 16))
    # the refinement clusters block1's tokens: the same labels as refine on them
    labels = r2o.refine(r2o.encoder_features(net, raw, 'block1'), superpixels, 3, 5,
                        torch.Generator().manual_seed(1))
    assert torch.equal(m1, r2o.view_masks(labels, boxes[:, 0], flips[:, 0], 3, 4))
    torch.manual_seed(0)
    model = r2o.R2O(net.train(), 32, 16)
    assert model.pool_layer == 'norm' and model.projector[0].in_features == 128
    loss = model(raw, raw.flip(-1), m1, m2)
    loss.backward()
    assert torch.isfinite(loss) and net.encoder.ln.weight.grad.abs().sum() > 0


def test_weight_decay_schedule_and_adamw_groups():
    assert r2o.weight_decay_schedule(0, 100) == pytest.approx(0.04)
    assert r2o.weight_decay_schedule(100, 100) == pytest.approx(0.4)
    assert r2o.weight_decay_schedule(50, 100) == pytest.approx(0.22)
    values = [r2o.weight_decay_schedule(s, 100) for s in range(101)]
    assert values == sorted(values)
    model = r2o.R2O(tiny_vit(), 32, 16)
    decay, none = r2o.adamw_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay['decay'] and not none['decay'] and none['weight_decay'] == 0.0
    assert {names[id(p)] for p in none['params']} == {
        n for n, p in model.named_parameters()
        if p.requires_grad and (n.endswith('bias') or p.dim() == 1)}
    assert any('ln_1.weight' in names[id(p)] for p in none['params'])       # LayerNorm: none
    assert any('in_proj_weight' in names[id(p)] for p in decay['params'])
    assert 'encoder.class_token' in {names[id(p)] for p in decay['params']}  # 3-D: DINO decays it
    assert not any('target' in names[id(p)] for g in (decay, none) for p in g['params'])


def test_step_update_sets_adamw_s_decay_and_clips_the_total_gradient_norm():
    model = r2o.R2O(tiny_vit(), 32, 16)
    opt = torch.optim.AdamW(r2o.adamw_param_groups(model), lr=0.0, weight_decay=0.04)
    params = [p for g in opt.param_groups for p in g['params']]
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    before = [p.detach().clone() for p in params]
    r2o.step_update(model, opt, 1e-3, 0.9, weight_decay=0.3, clip_grad=3.0)
    assert [g['weight_decay'] for g in opt.param_groups] == [0.3, 0.0]
    assert [g['lr'] for g in opt.param_groups] == [1e-3, 1e-3]
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) == \
        pytest.approx(3.0, rel=1e-4)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def test_vit_defaults_to_adamw_and_lars_stays_the_resnet_default(tmp_path):
    vit = r2o.resolve_args(tiny_args(tmp_path, 'v', '--arch', 'vit_s_16'))
    assert (vit.optimizer, vit.lr, vit.weight_decay, vit.weight_decay_end, vit.clip_grad) == \
        ('adamw', 5e-4, 0.04, 0.4, 3.0)
    resnet = r2o.resolve_args(tiny_args(tmp_path, 'r'))
    assert (resnet.optimizer, resnet.lr, resnet.weight_decay, resnet.clip_grad) == \
        ('lars', 2.4, 1e-6, 0.0)
    assert r2o.resolve_args(tiny_args(tmp_path, 'v', '--arch', 'vit_s_16', '--optimizer', 'lars')
                            ).weight_decay == 1e-6
    assert r2o.resolve_args(tiny_args(tmp_path, 'v', '--arch', 'vit_s_16', '--image-size', '48'))
    with pytest.raises(data.DataError, match='multiple of 32'):
        r2o.resolve_args(tiny_args(tmp_path, 'r', '--image-size', '48'))
    with pytest.raises(data.DataError, match='AdamW'):
        r2o.resolve_args(tiny_args(tmp_path, 'r', '--weight-decay-end', '0.1'))


def test_a_vit_run_resumes_exactly_and_exports_a_torchvision_vit(tmp_path, monkeypatch):
    monkeypatch.setitem(r2o.VIT_ARCHS, 'vit_tiny', TINY_VIT)
    r2o.main(tiny_args(tmp_path, 'straight', '--arch', 'vit_tiny', '--vis-every', '0'))
    r2o.main(tiny_args(tmp_path, 'resumed', '--arch', 'vit_tiny', '--stop-after', '1'))
    r2o.main(tiny_args(tmp_path, 'resumed', '--arch', 'vit_tiny'))
    a = torch.load(tmp_path / 'straight' / 'checkpoint.pt', weights_only=True)
    b = torch.load(tmp_path / 'resumed' / 'checkpoint.pt', weights_only=True)
    assert a['args']['optimizer'] == 'adamw' and a['step'] == b['step'] == 8
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['optimizer']['param_groups'][0]['weight_decay'] == \
        pytest.approx(r2o.weight_decay_schedule(7, 8))
    assert str(a['optimizer']['state'][0]['step']) == str(b['optimizer']['state'][0]['step'])
    assert not list((tmp_path / 'straight').glob('masks-epoch*.png'))          # --vis-every 0
    assert sorted(p.name for p in (tmp_path / 'resumed').glob('masks-epoch*.png')) == \
        ['masks-epoch0001.png', 'masks-epoch0002.png']
    # backbone.pt is a torchvision VisionTransformer state_dict, for the training size
    state = torch.load(tmp_path / 'straight' / 'backbone.pt', weights_only=True)
    net = torchvision.models.VisionTransformer(32, **TINY_VIT)
    net.heads = torch.nn.Identity()
    net.load_state_dict(state)
    # eval_cub reads it, its shape from the keys, and clusters block1 by default
    loaded, info = eval_cub.load_encoder(tmp_path / 'straight' / 'backbone.pt')
    assert (info['kind'], info['arch']) == ('backbone', 'vit_tiny')     # the shapes name it
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(r2o.encoder_features(loaded, x, 'norm'), r2o.encoder_features(net.eval(), x, 'norm'))
    results = run_eval(tmp_path / 'straight' / 'checkpoint.pt', '--builtin-images', 4,
                       '--input-size', 64, '--out', tmp_path / 'r.json')
    assert results['encoder']['arch'] == 'vit_tiny'
    assert (results['protocol']['features'], results['protocol']['feature_grid']) == ('block1', 4)


def timm_vit_state(depth=2, width=128, image_size=224, seed=0):
    """A state_dict in the layout of DINO's ViT releases (timm's names), random weights."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    n = (image_size // 16) ** 2
    state = {'cls_token': r(1, 1, width), 'pos_embed': r(1, n + 1, width),
             'patch_embed.proj.weight': r(width, 3, 16, 16) * 0.1, 'patch_embed.proj.bias': r(width),
             'norm.weight': 1 + r(width), 'norm.bias': r(width)}
    for i in range(depth):
        for name, shape in (('norm1', (width,)), ('attn.qkv', (3 * width, width)),
                            ('attn.proj', (width, width)), ('norm2', (width,)),
                            ('mlp.fc1', (4 * width, width)), ('mlp.fc2', (width, 4 * width))):
            state[f'blocks.{i}.{name}.weight'] = (1 + r(*shape)) if len(shape) == 1 else r(*shape)
            state[f'blocks.{i}.{name}.bias'] = r(shape[0])
    return state


def timm_vit_reference(state, x, heads, blocks):
    """The forward of a timm ViT written from its layout: patch tokens after `blocks` blocks
    (all of them: after the final norm), as B x C x h x w."""
    w = lambda name: state[name + '.weight']
    b = lambda name: state[name + '.bias']
    t = F.conv2d(x, w('patch_embed.proj'), b('patch_embed.proj'), stride=16)
    B, C, h, wd = t.shape
    t = torch.cat([state['cls_token'].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    pos = state['pos_embed']
    side = int((pos.shape[1] - 1) ** 0.5)
    if side != h:
        grid = pos[:, 1:].reshape(1, side, side, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, wd), mode='bicubic', align_corners=False)
        pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
    t = t + pos
    depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
    for i in range(blocks):
        p = f'blocks.{i}.'
        y = F.layer_norm(t, (C,), w(p + 'norm1'), b(p + 'norm1'), eps=1e-6)
        q, k, v = F.linear(y, w(p + 'attn.qkv'), b(p + 'attn.qkv')).view(
            B, -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        t = t + F.linear((attn @ v).transpose(1, 2).reshape(B, -1, C), w(p + 'attn.proj'),
                         b(p + 'attn.proj'))
        y = F.layer_norm(t, (C,), w(p + 'norm2'), b(p + 'norm2'), eps=1e-6)
        t = t + F.linear(F.gelu(F.linear(y, w(p + 'mlp.fc1'), b(p + 'mlp.fc1'))),
                         w(p + 'mlp.fc2'), b(p + 'mlp.fc2'))
    if blocks == depth:
        t = F.layer_norm(t, (C,), w('norm'), b('norm'), eps=1e-6)
    return t[:, 1:].transpose(1, 2).reshape(B, C, h, wd)


def test_dino_s_timm_layout_maps_onto_torchvision_s_vit(tmp_path):
    state = timm_vit_state()
    torch.save(state, tmp_path / 'dino_deitsmall16_pretrain.pth')
    net, info = eval_cub.load_encoder(tmp_path / 'dino_deitsmall16_pretrain.pth')
    assert info['kind'] == 'timm-vit' and '2 heads' in info['arch']
    assert net.image_size == 224
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for size in (224, 64):                  # 64: the position embedding interpolated
            x = torch.randn(2, 3, size, size, generator=g)
            for layer, blocks in (('block1', 1), ('block2', 2), ('norm', 2)):
                ours = r2o.encoder_features(net, x, layer)
                expected = timm_vit_reference(state, x, 2, blocks)
                if layer == 'block2':           # before the final norm
                    assert not torch.allclose(ours, timm_vit_reference(state, x, 2, 2))
                    continue
                assert torch.allclose(ours, expected, atol=1e-4), (size, layer)
    # with the release's names under a DINO checkpoint's prefix, and a classifier head beside it
    prefixed = {f'module.backbone.{k}': v for k, v in state.items()}
    prefixed['module.head.weight'] = torch.zeros(10, 128)
    torch.save(prefixed, tmp_path / 'prefixed.pth')
    net2, _ = eval_cub.load_encoder(tmp_path / 'prefixed.pth')
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(r2o.encoder_features(net2, x, 'norm'), r2o.encoder_features(net, x, 'norm'))
    # the real release's shapes: width 384, 12 blocks -> vit_s_16 (6 heads)
    assert eval_cub.build_vit(eval_cub.timm_vit_to_torchvision(timm_vit_state(12, 384)))[1] == 'vit_s_16'
