"""What R2O costs over BYOL: the superpixel prior in the loader, the refinement in the step.

Every figure is printed as a ratio against a baseline measured in the same run, next to the
absolute numbers and the machine. Run it on a quiet machine: it prints how many cores other
processes kept busy, and warns when that is not about zero.

    python bench.py                      # CPU: about 2.5 minutes on 2 cores; uses the GPU if any
    python bench.py --quick              # tiny sizes, a smoke test: ~30 s, mostly importing torch
                                         # in this process and the 3 memory ones
    python bench.py --json bench.json    # also save every figure

1. loader work per worker, in this process on one thread (a worker = dataset[(epoch, i)] in a
   loop): SLIC at the training size for every sample (the reference's way) vs. cached
   superpixels on a second epoch (ours) vs. the same with --resample pillow vs. no superpixels
   at all vs. torchvision's BYOL two-view pipeline. Real decode: generated scenes saved as JPEG
   (or, with --loader-photos FOLDER, that folder's first photos), ImageFolderDataset at 224
   with 100 superpixels, as on ImageNet.
2. one training step (r2o.step_loss, backward, r2o.step_update: what r2o.train_one_epoch does
   per batch): R2O with K=128 and K=4 vs. the same model and batch with K=1 (BYOL); K=128 again
   with the empty rows computed the other device's way, and with --deterministic. CPU: resnet18,
   64 px, batch 32, 24 superpixels (the demo preset); GPU: resnet50, 224 px, batch 32, 100
   superpixels, bf16 autocast.
3. r2o.kmeans alone, in ms and as a fraction of the R2O step.
4. peak memory of a step, R2O vs. BYOL (GPU: max_memory_allocated; CPU: peak RSS of a fresh
   process per variant).
5. how exactly the masks hold each cluster's share of a cell: r2o.view_masks (roi_align,
   aligned=True) and the reference's aligned=False against the exact area fractions, on random
   crop boxes of refined label maps.
6. r2o.train_one_epoch on JPEG scenes against the bench step. 7. batches of 32-256.
8. floating-point operations of a step (counted on meta tensors, any machine) at the GPU
   configuration and at part 2's: R2O over BYOL in arithmetic alone, a floor under the time
   ratio unless the extra work runs faster per operation than the network does.
9. the Gaussian blur of one 224 px view on one thread, at sigmas drawn as the loader draws them:
   data.gaussian_blur (the reference's 23-tap Gaussian, separable: the default) vs. Pillow's
   box-filter approximation (--blur pillow) vs. the same Gaussian as a 2-D 23 x 23 kernel.
10. (not in the default --parts; --parts vit) one training step with a ViT-S/16 and AdamW (its
   weight decay set and gradients clipped each step, as r2o.py --arch vit_s_16 trains): R2O with
   K=128 and K=4 vs. BYOL (K=1) with the same ViT and batch. CPU: 64 px, batch 32, 24
   superpixels; GPU: 224 px, batch 32, 100 superpixels, bf16 autocast.
    python bench.py --parts vit
11. resizing a view's crop box to 224 px on one thread, boxes drawn as the loader draws them on
   400 px generated scenes and on noise: torch's uint8 kernel (--resample torch, the default)
   vs. Pillow (--resample pillow); how far torch's is from Pillow's two passes (horizontal, then
   vertical, as Pillow ran them before 13), and how often the installed Pillow's own resize
   differs from those two passes.
"""
import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import PIL
import skimage
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import roi_align

import data
import r2o

# the training step measured in part 2 (and 3, 4): the demo preset on CPU, the paper's on GPU
STEP_CPU = dict(arch='resnet18', image_size=64, batch_size=32, superpixels=24)
STEP_GPU = dict(arch='resnet50', image_size=224, batch_size=32, superpixels=100)
STEP_QUICK = dict(arch='resnet18', image_size=64, batch_size=8, superpixels=24)
K_R2O = (128, 4)            # the curriculum's two ends
# part 10: part 2's step with a ViT-S/16 (r2o.py --arch vit_s_16) and its AdamW
VIT_CPU = dict(STEP_CPU, arch='vit_s_16')
VIT_GPU = dict(STEP_GPU, arch='vit_s_16')
VIT_QUICK = dict(STEP_QUICK, arch='vit_s_16')
# K=128 again with the empty rows computed the other device's way: merged
# (heads_merging_empty_rows, the CPU's default) on a GPU, every row through the heads (the GPU's
# default) on a CPU
OTHER_WAY = '128 other way'
# K=128 again as --deterministic runs it: deterministic algorithms, and on a GPU k-means sums by
# a one-hot matrix product
DETERMINISTIC = '128 deterministic'
BATCH_KEYS = ('view1', 'view2', 'raw', 'superpixels', 'boxes', 'flips')


def get_args_parser():
    p = argparse.ArgumentParser('R2O benchmark')
    p.add_argument('--quick', action='store_true', help='tiny sizes, for a smoke test (figures mean little)')
    p.add_argument('--json', default=None, help='save every figure to this file')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--parts', default='loader,step,kmeans,memory,masks,loop,batches,flops,blur,resample',
                   help='comma-separated subset of: loader, step, kmeans, memory, masks, loop, '
                        'batches, flops, blur, resample (all of these), vit (a ViT-S/16 step: not '
                        'in the default)')
    p.add_argument('--loader-images', type=int, default=None,
                   help='JPEG scenes (or --loader-photos) per loader pass (48; quick 3)')
    p.add_argument('--loader-photos', default=None, metavar='FOLDER',
                   help='time the loader part on the first --loader-images photos of this folder '
                        '(e.g. ImageNet\'s train/) instead of generated JPEG scenes')
    p.add_argument('--loader-rounds', type=int, default=None,
                   help='interleaved passes per loader variant; the best one counts (2; quick 1)')
    p.add_argument('--mask-boxes', type=int, default=None, help='crop boxes for part 5 (200; quick 20)')
    p.add_argument('--blur-calls', type=int, default=None,
                   help='blurred views per variant in part 9, and boxes per image in part 11, the '
                        'median counts (200; quick 20)')
    p.add_argument('--scene-size', type=int, default=400,
                   help='generated scene side in pixels, 400 (ImageNet photos are about 375x500)')
    p.add_argument('--steps', type=int, default=None,
                   help='timed steps per variant, the median counts (8; quick 1)')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps per variant first (2; quick 1)')
    p.add_argument('--kmeans-iters', type=int, default=30, help='Lloyd iterations, as r2o.py --kmeans-iters (30)')
    p.add_argument('--_memory-child', dest='memory_child', type=int, default=None, help=argparse.SUPPRESS)
    return p


# ================================ machine and timing ================================

def machine_info(device):
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, torchvision=torchvision.__version__, numpy=np.__version__,
                skimage=skimage.__version__, python=platform.python_version(), device=str(device),
                load_average_at_start=[round(x, 2) for x in os.getloadavg()],
                busy_cores_at_start=busy_cores())
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def busy_cores(seconds=1.0):
    """How many cores other processes keep busy, from /proc/stat over `seconds` while this one
    sleeps (None where there is no /proc/stat). A quiet machine reads about 0."""
    def read():
        fields = [int(x) for x in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]          # all time, idle + iowait
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return round((1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1), 2)


def clock(device):
    """perf_counter after the device's queued work is done (GPU kernels run asynchronously)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median_ms(fn, reps, device, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = clock(device)
        fn()
        times.append((clock(device) - start) * 1000)
    return statistics.median(times)


@contextmanager
def single_thread():
    """torch on one thread inside the block: what one loader worker gets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ================================ part 1: loader work per worker ================================

class NoSuperpixelsDataset(data.ImageFolderDataset):
    """The same samples with an all-zero superpixel map and no SLIC: the loader's floor."""

    def superpixels(self, index, image=None):
        return np.zeros((self.mask_size, self.mask_size), np.int64)


class TorchvisionBYOL:
    """The usual BYOL loader, torchvision's transforms on each of two views (decode included):
    the baseline a user would otherwise run. Indexed like the project's datasets."""

    def __init__(self, root, size=224):
        import torchvision.transforms as T
        self.files, _ = data.find_images(root)

        def view(blur_p, solarize_p):
            return T.Compose([
                T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2), T.RandomApply([T.GaussianBlur(23, (0.1, 2.0))], p=blur_p),
                T.RandomSolarize(128, p=solarize_p), T.ToTensor(),
                T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
        self.views = (view(1.0, 0.0), view(0.1, 0.2))

    def __getitem__(self, item):
        img = data.load_image(self.files[item[1]])
        return [v(img) for v in self.views]


def write_scenes(folder, n, size):
    """n generated scenes as JPEG (quality 90) in `folder`, like a folder of photos."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(data.synthetic_scene(i, size)[0]).save(folder / f'{i:05d}.jpg', quality=90)
    return folder


def photo_sample(folder, n, into):
    """The first n images under `folder` (sorted, as the training script lists them), linked
    into a folder of their own so that each loader variant reads just them."""
    files, _ = data.find_images(folder)
    if len(files) < n:
        raise SystemExit(f'--loader-photos {folder}: {len(files)} images, --loader-images asks {n}')
    into.mkdir(parents=True)
    for i in range(n):
        (into / f'{i:05d}{Path(files[i]).suffix}').symlink_to(Path(files[i]).resolve())
    return into


def loader_pass(dataset, epoch, n):
    """ms per sample for dataset[(epoch, i)], i < n: one loader worker's work."""
    start = time.perf_counter()
    for i in range(n):
        dataset[(epoch, i)]
    return (time.perf_counter() - start) * 1000 / n


def bench_loader(scenes, cache_dir, n, rounds, device):
    common = dict(image_size=224, n_segments=100)
    reference = data.ImageFolderDataset(scenes, cache_dir=None, superpixel_map=r2o.superpixel_map, **common)
    cached = data.ImageFolderDataset(scenes, cache_dir=cache_dir, superpixel_map=r2o.superpixel_map,
                                    **common)
    pillow = data.ImageFolderDataset(scenes, cache_dir=cache_dir, superpixel_map=r2o.superpixel_map,
                                    resample='pillow', **common)
    no_superpixels = NoSuperpixelsDataset(scenes, superpixel_map=r2o.superpixel_map, **common)
    byol = TorchvisionBYOL(scenes)
    with single_thread():
        loader_pass(no_superpixels, 0, min(n, 2))                 # import and allocator warm-up
        first_epoch = loader_pass(cached, 0, n)                    # fills the cache
        passes = dict(reference=[], cached=[], pillow=[], none=[], byol=[])
        for _ in range(rounds):                                    # interleaved: drift hits all
            passes['reference'].append(loader_pass(reference, 1, n))
            passes['cached'].append(loader_pass(cached, 1, n))
            passes['pillow'].append(loader_pass(pillow, 1, n))
            passes['none'].append(loader_pass(no_superpixels, 1, n))
            passes['byol'].append(loader_pass(byol, 1, n))
    ms = {name: min(v) for name, v in passes.items()}              # noise only ever adds time
    # the colour augmentation the loader no longer does: a batch of 32 views on the device
    samples = [cached[(1, i % n)] for i in range(32)]
    batch = data.collate(samples)
    on = {k: batch[k].to(device) for k in ('view1', 'view2', 'raw', 'photometric')}
    photometric_ms = median_ms(lambda: data.finish_on_device(dict(on)), 5, device)
    return dict(images=n, rounds=rounds, image_size=224, n_segments=100,
                ms_per_sample_reference=ms['reference'], ms_per_sample_cached=ms['cached'],
                ms_per_sample_no_superpixels=ms['none'], ms_per_sample_first_epoch=first_epoch,
                ms_per_sample_cached_pillow_resampling=ms['pillow'],
                all_passes_ms=passes,
                ms_per_sample_torchvision_byol=ms['byol'],
                photometric_ms_per_batch_of_32=photometric_ms, photometric_device=str(device),
                byol_over_cached=ms['byol'] / ms['cached'],
                cores_per_gpu_at_556=556 * ms['cached'] / 1000,     # the paper's schedule in a day
                speedup_vs_reference=ms['reference'] / ms['cached'],
                cached_over_no_superpixels=ms['cached'] / ms['none'])


# ================================ part 2: one training step ================================

def step_config(device, quick):
    cfg = STEP_QUICK if quick else (STEP_GPU if device.type == 'cuda' else STEP_CPU)
    return dict(cfg)


def step_run(device, iters, cluster_batch=None, deterministic=False):
    """The run constants r2o.step_loss reads, made by r2o.run_constants from the flags of a run
    (precision, clustering, --cluster-batch, --deterministic); `deterministic` also tells
    train_step to switch torch's deterministic algorithms on around the step."""
    argv = ['--kmeans-iters', str(iters), '--device', str(device)]
    if cluster_batch:
        argv += ['--batch-size', str(cluster_batch), '--cluster-batch', str(cluster_batch)]
    args = r2o.resolve_args(r2o.get_args_parser().parse_args(argv + ['--deterministic'] * deterministic))
    return dict(r2o.run_constants(args, 0, 1, device, 1), deterministic=deterministic)


def step_batch(cfg, device):
    """One batch of generated scenes, as the demo's loader makes it, on the device."""
    dataset = data.SyntheticDataset(n_images=cfg['batch_size'], scene_size=2 * cfg['image_size'],
                                    superpixel_map=r2o.superpixel_map,
                                    image_size=cfg['image_size'], n_segments=cfg['superpixels'])
    batch = data.collate([dataset[(0, i)] for i in range(len(dataset))])
    return r2o.batch_to_device(batch, device, channels_last=device.type == 'cuda')


def step_model(cfg, device, merge_empty_rows=None):
    """The model and LARS as r2o.main builds them (same seed, so every variant starts equal):
    the empty rows merged on a CPU unless told otherwise. lr = 0.3 x batch/256 without the K/16
    factor: it changes nothing in the time of a step."""
    torch.manual_seed(0)
    merge = device.type == 'cpu' if merge_empty_rows is None else merge_empty_rows
    model = r2o.build_model(cfg['arch'], merge_empty_rows=merge).to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = r2o.LARSForeach(r2o.lars_param_groups(model), weight_decay=1e-6)
    for group in optimizer.param_groups:
        group['lr'] = 0.3 * cfg['batch_size'] / 256
    return model, optimizer


def autocast_for(device):
    if device.type == 'cuda' and torch.cuda.is_bf16_supported():
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def deterministic_algorithms(on):
    """torch's deterministic algorithms inside the block (what r2o.py --deterministic sets for
    the whole run; CUBLAS_WORKSPACE_CONFIG is set when this script starts)."""
    if not on:
        yield
        return
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, benchmark = True, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, benchmark


def train_step(model, optimizer, batch, k, run, device, **update):
    """One step as r2o.train_one_epoch takes it (the same three calls); returns ms per phase and
    the mask pairs used. update: step_update's weight_decay and clip_grad (AdamW's)."""
    with deterministic_algorithms(run['deterministic']):
        t = [clock(device)]
        loss, pairs = r2o.step_loss(model, model, batch, k, r2o.step_generator(0, 0, 0), run)
        t.append(clock(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.append(clock(device))
        r2o.step_update(model, optimizer, optimizer.param_groups[0]['lr'], 0.99, **update)
        t.append(clock(device))
    ms = np.diff(t) * 1000
    return dict(loss=ms[0], backward=ms[1], update=ms[2], total=ms.sum()), int(pairs)


def bench_step(cfg, batch, device, iters, steps, warmup):
    variants = [*K_R2O, 1, OTHER_WAY, DETERMINISTIC]
    k_of = {v: 128 if v in (OTHER_WAY, DETERMINISTIC) else v for v in variants}
    runs = {v: step_model(cfg, device, (device.type == 'cuda') if v == OTHER_WAY else None)
            for v in variants}
    settings = {v: step_run(device, iters, deterministic=v == DETERMINISTIC) for v in variants}
    errors = {}
    for k in list(variants):                     # a variant this machine cannot run is reported
        try:                                     # and left out, so the other figures still come
            train_step(*runs[k], batch, k_of[k], settings[k], device)
        except RuntimeError as e:
            errors[str(k)] = ' '.join(str(e).split())[:300]
            variants.remove(k)
    for _ in range(warmup - 1):
        for k in variants:
            train_step(*runs[k], batch, k_of[k], settings[k], device)
    phases = {k: [] for k in variants}
    pairs = {k: [] for k in variants}
    for _ in range(steps):                       # interleaved, so drift hits every variant
        for k in variants:
            ms, n_pairs = train_step(*runs[k], batch, k_of[k], settings[k], device)
            phases[k].append(ms)
            pairs[k].append(n_pairs)
    out = dict(config=cfg, steps=steps, warmup=warmup, kmeans_iters=iters,
               bf16=device.type == 'cuda' and torch.cuda.is_bf16_supported(), variants={},
               errors=errors)
    for k in variants:
        med = {name: statistics.median(p[name] for p in phases[k]) for name in phases[k][0]}
        out['variants'][k] = dict(ms=med, mask_pairs_per_image=statistics.mean(pairs[k]) / cfg['batch_size'],
                                  all_totals_ms=[round(p['total'], 1) for p in phases[k]])
    byol = out['variants'][1]['ms']['total']
    for k in variants:
        out['variants'][k]['over_byol'] = out['variants'][k]['ms']['total'] / byol
    if DETERMINISTIC in variants:
        out['deterministic_over_default'] = (out['variants'][DETERMINISTIC]['ms']['total'] /
                                             out['variants'][K_R2O[0]]['ms']['total'])
    out['refinement'] = bench_refinement(runs[K_R2O[0]][0], batch, cfg, iters, device, steps)
    return out, runs[K_R2O[0]][0]


def bench_vit(cfg, device, iters, steps, warmup):
    """Part 10: R2O's step at K=128 and K=4 against BYOL's (K=1), every variant with the same
    ViT-S/16 (same seed) and batch, AdamW with DINO's groups at lr 5e-4 x batch/256, weight
    decay 0.04 and gradients clipped to 3.0 each step, as r2o.py trains a ViT."""
    batch = step_batch(cfg, device)
    variants = [*K_R2O, 1]
    runs = {}
    for k in variants:
        torch.manual_seed(0)
        model = r2o.build_model(cfg['arch'], merge_empty_rows=device.type == 'cpu',
                                image_size=cfg['image_size']).to(device).train()
        optimizer = torch.optim.AdamW(r2o.adamw_param_groups(model), weight_decay=0.04,
                                      lr=5e-4 * cfg['batch_size'] / 256)
        runs[k] = model, optimizer
    run = step_run(device, iters)
    update = dict(weight_decay=0.04, clip_grad=3.0)
    for _ in range(warmup):
        for k in variants:
            train_step(*runs[k], batch, k, run, device, **update)
    phases = {k: [] for k in variants}
    for _ in range(steps):                       # interleaved, so drift hits every variant
        for k in variants:
            phases[k].append(train_step(*runs[k], batch, k, run, device, **update)[0])
    out = dict(config=cfg, steps=steps, warmup=warmup, kmeans_iters=iters, variants={})
    for k in variants:
        out['variants'][k] = dict(ms={name: statistics.median(p[name] for p in phases[k])
                                      for name in phases[k][0]})
    for k in variants:
        out['variants'][k]['over_byol'] = (out['variants'][k]['ms']['total'] /
                                           out['variants'][1]['ms']['total'])
    return out


@torch.no_grad()
def bench_refinement(model, batch, cfg, iters, device, reps):
    """The pieces of masks_for_batch one at a time: target layer3 on the raw view, refine
    (superpixel pooling + k-means + painting), both views' masks."""
    g = cfg['image_size'] // r2o.STRIDE[r2o.POOL_LAYER]
    boxes, flips = batch['boxes'], batch['flips']
    n = batch['n_superpixels']
    out = {}
    with autocast_for(device):
        features = r2o.encoder_features(model.target_encoder, batch['raw'], r2o.CLUSTER_LAYER)
        out['layer3_raw_view'] = median_ms(
            lambda: r2o.encoder_features(model.target_encoder, batch['raw'], r2o.CLUSTER_LAYER),
            reps, device)
        for k in K_R2O:
            labels = r2o.refine(features, batch['superpixels'], k, iters, n_superpixels=n)
            out[f'refine_k{k}'] = median_ms(
                lambda: r2o.refine(features, batch['superpixels'], k, iters, n_superpixels=n),
                reps, device)
            out[f'view_masks_k{k}'] = median_ms(
                lambda: (r2o.view_masks(labels, boxes[:, 0], flips[:, 0], k, g),
                         r2o.view_masks(labels, boxes[:, 1], flips[:, 1], k, g)), reps, device)
    return out


# ================================ part 3: k-means alone ================================

@torch.no_grad()
def pooled_superpixel_features(model, batch, device):
    """The rows refine() clusters: L2-normalised layer3 features pooled in each superpixel."""
    with autocast_for(device):
        features = r2o.encoder_features(model.target_encoder, batch['raw'], r2o.CLUSTER_LAYER)
    pooled, area = r2o.superpixel_pool(features.float(), batch['superpixels'])
    return F.normalize(pooled[area > 0], dim=1)


def rounds_kmeans(x, k, iters=30, generator=None):
    """r2o.kmeans with --kmeans-seeding rounds (D^2 seeding in rounds), the same Lloyd steps."""
    return r2o.kmeans(x, k, iters, generator, seeding=r2o.kmeans_seeds_in_rounds)


def converged_kmeans(x, k, generator=None, tol=1e-6, cap=200):
    """The reference's stopping rule: greedy k-means++ seeding (r2o.kmeans_seeds), then Lloyd
    steps (r2o.kmeans's, one at a time from the last centroids) until the inertia changes by
    less than tol (relative), at most cap. Returns the inertia and the number of steps."""
    centroids, previous = r2o.kmeans_seeds(x.float(), min(k, x.shape[0]), generator), None
    for steps in range(1, cap + 1):
        labels, centroids = r2o.kmeans(x, k, 1, seeding=lambda *_, c=centroids: c)
        value = inertia(x, labels, centroids)
        if previous is not None and abs(previous - value) <= tol * previous:
            break
        previous = value
    return value, steps


def inertia(x, labels, centroids):
    return ((x.float() - centroids[labels]) ** 2).sum().item()


def planted_clusters(n, dim, k, device, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g)
    x = centres[torch.randint(k, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1).to(device)


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations that do work (views excluded). At k-means sizes a GPU
    spends its time launching them, so the count predicts the GPU time on any machine."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def ops_per_call(fn):
    with OpCounter() as counter:
        fn()
    return counter.count


def bench_kmeans(model, batch, step, device, quick, iters):
    n_images = 4 if quick else 32
    torch.manual_seed(0)
    paper = F.normalize(torch.randn(n_images * 100, 1024, device=device), dim=1)
    real = pooled_superpixel_features(model, batch, device)
    cfg = step['config']
    sizes = {f'paper size: {n_images} images x 100 superpixels, 1024 channels (resnet50 layer3), '
             'random unit vectors': paper,
             f'step size: the {real.shape[0]} superpixels of the step\'s {cfg["batch_size"]} images '
             f'(SLIC n_segments={cfg["superpixels"]}), {real.shape[1]} channels ({cfg["arch"]} layer3), '
             'real features': real}
    out = {}
    for name, x in sizes.items():
        entry = dict(rows=x.shape[0], dim=x.shape[1], iters=iters)
        for k in K_R2O:
            ms = median_ms(lambda: r2o.kmeans(x, k, iters), 1 if quick else 5, device)
            entry[f'ms_k{k}'] = ms
            entry[f'fraction_of_r2o_step_k{k}'] = ms / step['variants'][k]['ms']['total']
        out[name] = entry
    # quality: inertia after the same Lloyd steps, the default (greedy k-means++ seeding) vs
    # --kmeans-seeding rounds, mean over seeds; and the reference's run to convergence
    n = 664 if quick else 2654                   # the paper-size figure of the GPU target
    quality = {f'planted: {n} x 1024, 128 clusters': (planted_clusters(n, 1024, 128, device), 128),
               f'real: {real.shape[0]} x {real.shape[1]} (step\'s layer3), K=128': (real, 128),
               f'real: {real.shape[0]} x {real.shape[1]} (step\'s layer3), K=4': (real, 4)}
    seeds = 2 if quick else 5
    for name, (x, k) in quality.items():
        ours, base = [], []
        for s in range(seeds):
            g = torch.Generator().manual_seed(s)
            ours.append(inertia(x, *r2o.kmeans(x, k, iters, g)))
            g = torch.Generator(device=device).manual_seed(s)
            base.append(inertia(x, *rounds_kmeans(x, k, iters, g)))
        out[f'quality, {name}'] = dict(
            rows=x.shape[0], dim=x.shape[1], k=k, seeds=seeds, inertia_greedy=statistics.mean(ours),
            inertia_rounds=statistics.mean(base),
            ratio=(statistics.mean(base) + 1e-9) / (statistics.mean(ours) + 1e-9),
            ms_greedy=median_ms(lambda: r2o.kmeans(x, k, iters), 1 if quick else 5, device),
            ms_rounds=median_ms(lambda: rounds_kmeans(x, k, iters), 1 if quick else 3,
                                          device))
        converged = [converged_kmeans(x, k, torch.Generator().manual_seed(s)) for s in range(seeds)]
        out[f'quality, {name}'].update(
            inertia_converged=statistics.mean(c[0] for c in converged),
            steps_converged=statistics.mean(c[1] for c in converged))
        if k == 128 and name.startswith('planted'):
            out[f'quality, {name}'].update(
                ops_greedy=ops_per_call(lambda: r2o.kmeans(x, k, iters)),
                ops_rounds=ops_per_call(lambda: rounds_kmeans(x, k, iters)))
    # --deterministic's k-means: the clusters summed by a one-hot matrix product, not index_add_
    x = planted_clusters(n, 1024, 128, device)
    out['deterministic sums'] = dict(
        rows=n, dim=1024, k=128,
        ms_index_add=median_ms(lambda: r2o.kmeans(x, 128, iters), 1 if quick else 5, device),
        ms_one_hot=median_ms(lambda: r2o.kmeans(x, 128, iters, deterministic=True),
                             1 if quick else 5, device))
    return out


# ================================ part 6: the real training loop ================================

def bench_loop(scenes, cfg, device, quick, step_ms):
    """r2o.train_one_epoch as r2o.main runs it: JPEG scenes from an ImageFolderDataset, loader
    workers, cached superpixels (a first epoch fills the cache), a fixed number of steps; its
    img/s against the bench step's (part 2, K=4) for the same model and batch."""
    steps = 2 if quick else 12
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    folder = scenes.parent / 'loop'
    folder.mkdir(exist_ok=True)
    files = sorted(scenes.glob('*.jpg'))
    for i in range(cfg['batch_size'] * steps):   # as many files as the steps need, by link
        target = folder / f'{i:05d}.jpg'
        if not target.exists():
            os.link(files[i % len(files)], target)
    argv = ['--data', str(folder), '--arch', cfg['arch'], '--image-size', str(cfg['image_size']),
            '--batch-size', str(cfg['batch_size']), '--superpixels', str(cfg['superpixels']),
            '--k-schedule', 'constant', '--k-max', '4', '--epochs', '2', '--workers', str(workers),
            '--superpixel-cache', str(scenes.parent / 'loop-cache'), '--device', str(device),
            '--print-freq', '1000000', '--output-dir', str(scenes.parent / 'loop-out')]
    args = r2o.resolve_args(r2o.get_args_parser().parse_args(argv))
    dataset = r2o.build_dataset(args)
    sampler, loader = r2o.build_loader(dataset, args, 0, 1, device)
    model, optimizer = step_model(cfg, device)
    run = r2o.run_constants(args, 0, 1, device, len(loader))
    out = dict(steps=steps, workers=workers, k=4)
    for epoch in (0, 1):                         # epoch 1 fills the superpixel cache
        sampler.set_epoch(epoch)
        _, stats = r2o.train_one_epoch(model, model, loader, optimizer, epoch, 0, args, run)
    out['loop_img_s'] = stats['images_per_s']
    out['step_img_s'] = cfg['batch_size'] / step_ms * 1000
    out['loop_over_step'] = out['loop_img_s'] / out['step_img_s']
    return out


# ================================ part 7: big per-GPU batches, clustered in groups ================================

def bench_batches(cfg, device, quick, iters, reps):
    """img/s of a whole step at growing per-GPU batches, k-means over each 32 images
    (--cluster-batch 32, the paper's clustering semantics), K=128."""
    sizes = (8, 16) if quick else ((32, 128, 256) if device.type == 'cuda' else (32, 64))
    out = {}
    for b in sizes:
        c = dict(cfg, batch_size=b)
        batch = step_batch(c, device)
        model, optimizer = step_model(c, device)
        run = step_run(device, iters, cluster_batch=min(32, b))
        train_step(model, optimizer, batch, 128, run, device)
        ms = statistics.median(train_step(model, optimizer, batch, 128, run, device)[0]['total']
                               for _ in range(reps))
        out[b] = dict(ms=ms, img_s=b / ms * 1000, cluster_batch=min(32, b))
        del model, optimizer, batch
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return out


def count_syncs(model, optimizer, batch, run, device):
    """Host-device synchronisations in one step (K=128) as train_one_epoch takes it, counted
    with torch.cuda.set_sync_debug_mode('warn'). GPU only."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            loss, pairs = r2o.step_loss(model, model, batch, 128, r2o.step_generator(0, 0, 0), run)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            r2o.step_update(model, optimizer, 0.01, 0.99)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = [str(w.message).splitlines()[0][:120] for w in caught]
    return dict(count=len(where), first=where[:5])


# ================================ part 4: peak memory ================================

def proc_status_kib(field):
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), KiB."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'no {field} in /proc/self/status: the CPU memory figure needs Linux')


def reset_hwm():
    """Reset the process's peak RSS (Linux: write 5 to /proc/self/clear_refs). False if not allowed."""
    try:
        Path('/proc/self/clear_refs').write_text('5')
        return True
    except OSError:
        return False


def memory_child(k, quick, device, iters):
    """Runs in a fresh process: how far RSS rises above its resting level during one step."""
    torch.set_num_threads(1)                   # three of these run at once; memory is per process
    cfg = step_config(device, quick)
    run = step_run(device, iters)
    batch = step_batch(cfg, device)
    model, optimizer = step_model(cfg, device)
    # the first steps allocate the LARS buffers and page in torch's kernels: not the step's cost
    for _ in range(2):
        train_step(model, optimizer, batch, k, run, device)
    resting = proc_status_kib('VmRSS')
    exact = reset_hwm()
    train_step(model, optimizer, batch, k, run, device)
    # without clear_refs, ru_maxrss is the whole life's peak: the warm-up steps' peaks count too
    peak = proc_status_kib('VmHWM') if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(k=k, step_peak_growth_mib=(peak - resting) / 1024,
                          resting_mib=resting / 1024, peak_reset=exact)))


def bench_memory_cpu(args, device):
    flags = ['--device', str(device), '--kmeans-iters', str(args.kmeans_iters)]
    flags += ['--quick'] if args.quick else []
    # every block of 64 KiB or more gets its own mmap, so a freed tensor leaves RSS at once and
    # the peak RSS follows the peak of live tensors (glibc otherwise keeps freed blocks)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    out = dict(method='CPU: a fresh process per variant (1 thread), 2 warm-up steps, then peak RSS '
                      'during one step (VmHWM after resetting it through /proc/self/clear_refs) minus '
                      'RSS before it, with MALLOC_MMAP_THRESHOLD_=65536 so that RSS tracks live tensors')
    procs = {k: subprocess.Popen([sys.executable, os.path.abspath(__file__), '--_memory-child', str(k),
                                  *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k in (*K_R2O, 1)}                 # side by side: each process has its own peak
    for k, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f'memory child K={k} failed:\n{stderr}')
        out[k] = json.loads(stdout.strip().splitlines()[-1])
        if not out[k]['peak_reset']:
            out['method'] += ' (clear_refs refused here: the peak is the process\'s whole-life ru_maxrss)'
    return out


def bench_memory_gpu(cfg, batch, run, device):
    out = dict(method='GPU: torch.cuda.max_memory_allocated during one step (after a warm-up '
                      'step) minus memory_allocated before it (model and LARS buffers: resting)')
    for k in (*K_R2O, 1):
        model, optimizer = step_model(cfg, device)
        train_step(model, optimizer, batch, k, run, device)   # LARS buffers exist from here on
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(model, optimizer, batch, k, run, device)
        peak = torch.cuda.max_memory_allocated(device)
        out[k] = dict(k=k, step_peak_growth_mib=(peak - before) / 2**20, peak_mib=peak / 2**20,
                      resting_mib=before / 2**20)
        del model, optimizer
        torch.cuda.empty_cache()
    return out


# ================================ part 5: how exact the masks are ================================

def exact_fractions(labels, box, k, out_size):
    """The exact share of each output cell that each cluster covers: labels M x M, box (x0, y0,
    x1, y1) in label cells. Returns k x out_size x out_size."""
    M = labels.shape[0]
    cells = torch.arange(M, dtype=torch.float64)

    def overlap(lo, hi):                 # out_size x M: how much of each label cell each output cell covers
        edges = torch.linspace(lo, hi, out_size + 1, dtype=torch.float64)
        return (torch.minimum(cells + 1, edges[1:, None]) - torch.maximum(cells, edges[:-1, None])).clamp(0)

    wx, wy = overlap(box[0], box[2]), overlap(box[1], box[3])
    area = wy.sum(1)[:, None] * wx.sum(1)[None]
    onehot = F.one_hot(labels, k).double()                                  # M x M x k
    return torch.einsum('ir,jc,rck->kij', wy, wx, onehot) / area


def bench_masks(n_boxes, maps='superpixels', k=8, M=56, out_size=7):
    """r2o.view_masks (roi_align, adaptive sampling, aligned=True) and the reference's
    aligned=False against the exact area fractions: the worst cell of each box's masks, over
    RandomResizedCrop boxes (scale 0.08-1). maps 'superpixels': label maps made of SLIC
    superpixels of generated scenes, each superpixel given one of k clusters at random (what
    the refinement paints); 'cells': every label cell a random cluster (the hardest case)."""
    rng = np.random.default_rng(0)
    worst = dict(aligned=[], reference=[])
    for i in range(n_boxes):
        if i % 10 == 0:                  # a new label map every 10 boxes
            if maps == 'cells':
                labels = torch.from_numpy(rng.integers(0, k, (M, M)))
            else:
                image = data.synthetic_scene(i, 4 * M)[0]
                superpixels = r2o.superpixel_map(image, 100, M)
                labels = torch.from_numpy(rng.integers(0, k, superpixels.max() + 1)[superpixels])
        area, ratio = rng.uniform(0.08, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = min(1.0, np.sqrt(area * ratio)), min(1.0, np.sqrt(area / ratio))
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        box = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
        exact = exact_fractions(labels, (box * M).double().tolist(), k, out_size)
        ours = r2o.view_masks(labels[None], box[None], torch.tensor([False]), k, out_size)
        worst['aligned'].append((ours[0].view_as(exact) - exact).abs().max().item())
        onehot = F.one_hot(labels[None], k).permute(0, 3, 1, 2).float()
        rois = torch.cat([torch.zeros(1, 1), box[None] * M], 1)
        theirs = roi_align(onehot, rois, out_size, 1.0, -1, aligned=False)[0]
        worst['reference'].append((theirs.double() - exact).abs().max().item())
    stats = lambda v: dict(median=float(np.median(v)), p90=float(np.percentile(v, 90)), max=float(np.max(v)))
    return dict(boxes=n_boxes, maps=maps, k=k, label_map=M, out_size=out_size,
                aligned=stats(worst['aligned']), reference_aligned_false=stats(worst['reference']))


@torch.no_grad()
def bench_superpixel_features(n_images, size=224, n_segments=100):
    """The superpixel features k-means clusters, ours against the reference's, on generated
    scenes at the training size with an untrained resnet50's layer3 (14 x 14): ours weight each
    cell by the share of it the superpixel covers (area); the reference's bilinearly resize the
    full-resolution one-hot map to 14 x 14 without antialiasing, which weights each cell by the
    2 x 2 pixels at its centre. Cosine of the two L2-normalised vectors per superpixel, and the
    share of superpixels the reference's sampling misses entirely (a zero row)."""
    torch.manual_seed(0)
    net = r2o.build_encoder('resnet50').eval()
    cosines, missed, total = [], 0, 0
    for i in range(n_images):
        image = data.synthetic_scene(i, size)[0]
        labels = torch.from_numpy(r2o.slic(image, n_segments=n_segments, start_label=0,
                                            channel_axis=-1).astype(np.int64))
        features = r2o.encoder_features(net, data.normalize(Image.fromarray(image))[None],
                                        r2o.CLUSTER_LAYER)[0].flatten(1)          # C x 196
        onehot = F.one_hot(labels, int(labels.max()) + 1).permute(2, 0, 1).float()[None]
        ours = F.adaptive_avg_pool2d(onehot, (14, 14))[0].flatten(1)
        theirs = F.interpolate(onehot, size=(14, 14), mode='bilinear', align_corners=False)[0].flatten(1)
        pooled = {name: (w @ features.T) / w.sum(1, keepdim=True).clamp_min(1e-12)
                  for name, w in (('ours', ours), ('theirs', theirs))}
        hit = theirs.sum(1) > 0
        missed += int((~hit).sum())
        total += len(hit)
        cosines += F.cosine_similarity(pooled['ours'][hit], pooled['theirs'][hit], dim=1).tolist()
    return dict(images=n_images, superpixels=total, cosine_mean=float(np.mean(cosines)),
                cosine_min=float(np.min(cosines)), cosine_p1=float(np.percentile(cosines, 1)),
                missed_by_reference=missed / total)


# ================================ part 8: arithmetic ================================

def step_flops(cfg):
    """Floating-point operations of one step (forward and backward), counted on meta tensors:
    BYOL (K=1), R2O at K=4 and K=128 with every row through the heads (random masks: no empty
    row, the reference's cost whatever the masks), and the refinement's target layer3 pass."""
    B, size = cfg['batch_size'], cfg['image_size']
    with torch.device('meta'):
        model = r2o.build_model(cfg['arch'])
        views = torch.randn(B, 3, size, size), torch.randn(B, 3, size, size)

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def step(k):
        with torch.device('meta'):
            masks = torch.rand(B, k, (size // 32) ** 2), torch.rand(B, k, (size // 32) ** 2)
        return count(lambda: model(*views, *masks).backward())

    with torch.no_grad():
        refine = count(lambda: r2o.encoder_features(model.target_encoder, views[0], r2o.CLUSTER_LAYER))
    byol = step(1)
    return dict(config=cfg, byol_tflop=byol / 1e12, refinement_pass_over_byol=refine / byol,
                **{f'r2o_k{k}_over_byol': (step(k) + refine) / byol for k in K_R2O})


# ================================ part 9: Gaussian blur ================================

def bench_blur(calls, scene_size):
    """ms per blurred 224 x 224 view on one thread (a loader worker's), median over `calls`
    sigmas drawn as data.color_augment draws them: Pillow's approximation and the separable
    Gaussian interleaved call by call, then the 2-D kernel in a loop of its own (run between them,
    its large convolution slows the call that follows it); and how far the separable Gaussian is
    from the 2-D kernel, pixel by pixel."""
    view = Image.fromarray(data.synthetic_scene(0, scene_size)[0]).resize((224, 224), Image.BICUBIC)
    ways = dict(pillow=lambda s: view.filter(ImageFilter.GaussianBlur(radius=s)),
                separable=lambda s: data.gaussian_blur(view, s),
                kernel2d=lambda s: TF.gaussian_blur(view, 23, s))
    rng = random.Random(0)
    sigmas = [rng.uniform(0.1, 2.0) for _ in range(calls)]
    times = {name: [] for name in ways}
    max_diff, differ = 0, 0
    with single_thread():
        for blur in ways.values():                                  # warm-up
            blur(1.0)
        for sigma in sigmas:
            for name in ('pillow', 'separable'):
                start = time.perf_counter()
                ways[name](sigma)
                times[name].append((time.perf_counter() - start) * 1000)
        for sigma in sigmas:
            start = time.perf_counter()
            exact = ways['kernel2d'](sigma)
            times['kernel2d'].append((time.perf_counter() - start) * 1000)
            diff = np.abs(np.asarray(ways['separable'](sigma), np.int16) - np.asarray(exact, np.int16))
            max_diff, differ = max(max_diff, int(diff.max())), differ + int((diff > 0).sum())
    ms = {name: statistics.median(t) for name, t in times.items()}
    return dict(calls=calls, image_size=224, taps=23, sigma_range=(0.1, 2.0),
                ms_pillow=ms['pillow'], ms_separable=ms['separable'], ms_kernel2d=ms['kernel2d'],
                separable_minus_pillow_ms=ms['separable'] - ms['pillow'],
                kernel2d_over_separable=ms['kernel2d'] / ms['separable'],
                separable_vs_kernel2d_max_diff=max_diff,
                separable_vs_kernel2d_differing=differ / (calls * 224 * 224 * 3))


# ================================ part 11: resampling ================================

def bench_resample(boxes, scene_size):
    """ms per 224 px view from a crop box, on one thread, torch's kernel and Pillow's interleaved
    box by box (median); the largest difference between torch's and Pillow's two passes run one
    after the other (horizontal first), and how many boxes the installed Pillow's own resize
    computes otherwise (Pillow 13 runs the vertical pass first where it judges it cheaper)."""
    rng = random.Random(0)
    images = {'scenes': Image.fromarray(data.synthetic_scene(0, scene_size)[0]),
              'noise': Image.fromarray(np.random.default_rng(0).integers(
                  0, 256, (scene_size, scene_size, 3), dtype=np.uint8))}
    times = dict(torch=[], pillow=[])
    out = {}
    with single_thread():
        for kind, img in images.items():
            pixels = data.pixels_of(img, 'torch')
            worst, off, pillow_moved, pillow_moved_by = 0, 0, 0, 0
            for _ in range(boxes):
                left, top, w, h = box = data.random_crop_box(rng, *img.size)
                start = time.perf_counter()
                ours = data.resized_crop(pixels, box, 224)
                times['torch'].append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                own = data.resized_crop(img, box, 224)
                times['pillow'].append((time.perf_counter() - start) * 1000)
                crop = img.crop((left, top, left + w, top + h))
                two_passes = torch.from_numpy(np.array(crop.resize((224, h), Image.BICUBIC).resize(
                    (224, 224), Image.BICUBIC))).permute(2, 0, 1).int()
                diff = (ours.int() - two_passes).abs()
                worst, off = max(worst, int(diff.max())), off + int((diff > 0).sum())
                moved = int((own.int() - two_passes).abs().max())
                pillow_moved += moved > 0
                pillow_moved_by = max(pillow_moved_by, moved)
            out[kind] = dict(torch_vs_two_passes_max=worst,
                             torch_vs_two_passes_differing=off / (boxes * 3 * 224 * 224),
                             pillow_own_differs_in_boxes=pillow_moved / boxes,
                             pillow_own_vs_two_passes_max=pillow_moved_by)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return dict(boxes=boxes, scene_size=scene_size, pillow=PIL.__version__, ms_torch=ms['torch'],
                ms_pillow=ms['pillow'], pillow_over_torch=ms['pillow'] / ms['torch'], **out)


# ================================ report ================================

def variant_name(k, gpu):
    """A step variant as the report names it: K, or what OTHER_WAY means on this device."""
    if k == OTHER_WAY:
        return '128, empty rows ' + ('merged' if gpu else 'each through the heads')
    return '128, --deterministic' if k == DETERMINISTIC else k


def verdict(ok):
    return 'PASS' if ok else 'FAIL'


def summary_rows(res):
    """(figure, value, baseline, ratio, target, PASS/FAIL or '') rows for the final table."""
    rows = []
    if 'vit' in res:
        V = res['vit']
        c, byol = V['config'], V['variants'][1]['ms']['total']
        for k in K_R2O:
            v = V['variants'][k]
            rows.append((f'ViT step R2O K={k} ({c["arch"]} {c["image_size"]}px b{c["batch_size"]}, '
                         'AdamW)', f'{v["ms"]["total"]:.0f} ms', f'BYOL-ViT {byol:.0f}',
                         f'{v["over_byol"]:.2f}x', '(info)', ''))
    if 'loader' in res:
        L = res['loader']
        rows.append(('loader/worker: cached, epoch 2', f'{L["ms_per_sample_cached"]:.1f} ms/img',
                     f'SLIC each time {L["ms_per_sample_reference"]:.1f}',
                     f'{L["speedup_vs_reference"]:.2f}x faster',
                     '>= 3.5x', verdict(L['speedup_vs_reference'] >= 3.5)))
        rows.append(('loader/worker: cached, epoch 2, vs torchvision BYOL two views',
                     f'{L["ms_per_sample_cached"]:.1f} ms/img',
                     f'torchvision {L["ms_per_sample_torchvision_byol"]:.1f}',
                     f'{L["byol_over_cached"]:.2f}x less CPU', '>= 3.5x',
                     verdict(L['byol_over_cached'] >= 3.5)))
        rows.append((f'colour augmentation of a batch of 32 on {L["photometric_device"]} (both views + raw)',
                     f'{L["photometric_ms_per_batch_of_32"]:.1f} ms', '', '', '(info)', ''))
        rows.append(('loader cores per GPU for 556 img/s (300 ImageNet epochs in a day on 8 GPUs)',
                     f'{L["cores_per_gpu_at_556"]:.1f}', '', '', '<= 4', verdict(L['cores_per_gpu_at_556'] <= 4)))
        rows.append(('loader/worker: cached, epoch 2', f'{L["ms_per_sample_cached"]:.1f} ms/img',
                     f'no superpixels {L["ms_per_sample_no_superpixels"]:.1f}',
                     f'{L["cached_over_no_superpixels"]:.2f}x', '<= 1.1x',
                     verdict(L['cached_over_no_superpixels'] <= 1.1)))
    gpu = res['machine']['device'].startswith('cuda')
    if 'step' in res:
        S = res['step']
        c = S['config']
        byol = S['variants'][1]['ms']['total']
        for k in [v for v in (*K_R2O, OTHER_WAY, DETERMINISTIC) if v in S['variants']]:
            v = S['variants'][k]
            limit = ({128: 1.15, 4: 1.15} if gpu else {128: 1.3, 4: 1.3})[128 if k in (OTHER_WAY, DETERMINISTIC) else k]
            name = variant_name(k, gpu)
            judged = k in K_R2O
            rows.append((f'step R2O K={name} ({c["arch"]} {c["image_size"]}px b{c["batch_size"]})',
                         f'{v["ms"]["total"]:.0f} ms', f'BYOL {byol:.0f}', f'{v["over_byol"]:.2f}x',
                         f'<= {limit}x' if judged else '(info)',
                         verdict(v['over_byol'] <= limit) if judged else ''))
        if 'deterministic_over_default' in S:
            ratio = S['deterministic_over_default']
            rows.append(('--deterministic step, K=128', f'{S["variants"][DETERMINISTIC]["ms"]["total"]:.0f} ms',
                         f'default {S["variants"][K_R2O[0]]["ms"]["total"]:.0f}', f'{ratio:.2f}x',
                         '(info)' if gpu else '<= 1.1x', '' if gpu else verdict(ratio <= 1.1)))
        for k, error in S.get('errors', {}).items():
            rows.append((f'step variant {k}: FAILED to run', error[:60], '', '', '', 'FAIL'))
        update = S['variants'][K_R2O[0]]['ms']['update']
        rows.append(('LARS + EMA per step', f'{update:.1f} ms', f'step {S["variants"][K_R2O[0]]["ms"]["total"]:.0f}',
                     f'{100 * update / S["variants"][K_R2O[0]]["ms"]["total"]:.1f}%',
                     '<= 4 ms' if gpu else '(info)', verdict(update <= 4) if gpu else ''))
        if 'syncs' in S:
            rows.append(('host syncs in one step', str(S['syncs']['count']), '', '', '(info)', ''))
    if 'kmeans' in res:
        for name, entry in res['kmeans'].items():
            if name.startswith('quality'):
                rows.append((f'kmeans inertia, --kmeans-seeding rounds vs greedy (default), {name[9:]}',
                             f'{entry["inertia_rounds"]:.1f}', f'greedy {entry["inertia_greedy"]:.1f}',
                             f'{entry["ratio"]:.4f}', '(info)', ''))
                rows.append((f'kmeans inertia, reference\'s run to convergence vs 30 steps, {name[9:]}',
                             f'{entry["inertia_converged"]:.1f} ({entry["steps_converged"]:.0f} steps)',
                             f'30 steps {entry["inertia_greedy"]:.1f}',
                             f'{(entry["inertia_converged"] + 1e-9) / (entry["inertia_greedy"] + 1e-9):.4f}', '(info)', ''))
                if entry['k'] == 128 and name.startswith('quality, planted'):
                    rows.append((f'kmeans time, {name[18:]}', f'{entry["ms_greedy"]:.1f} ms',
                                 f'rounds {entry["ms_rounds"]:.1f}',
                                 f'{entry["ms_greedy"] / entry["ms_rounds"]:.2f}x rounds\'',
                                 '<= 3 ms' if gpu else '(info)', verdict(entry['ms_greedy'] <= 3) if gpu else ''))
                if 'ops_greedy' in entry:
                    rows.append((f'kmeans tensor ops per call, {name[18:]}', str(entry['ops_greedy']),
                                 f'rounds {entry["ops_rounds"]}',
                                 f'{entry["ops_greedy"] / entry["ops_rounds"]:.2f}x', '(info)', ''))
                continue
            if name == 'deterministic sums':
                rows.append((f'kmeans {entry["rows"]}x{entry["dim"]}, K=128, one-hot sums (--deterministic)',
                             f'{entry["ms_one_hot"]:.1f} ms', f'index_add_ {entry["ms_index_add"]:.1f}',
                             f'{entry["ms_one_hot"] / entry["ms_index_add"]:.2f}x', '(info)', ''))
                continue
            on_step = name.startswith('step size')
            for k in K_R2O:
                frac = entry[f'fraction_of_r2o_step_k{k}']
                step_ms = res['step']['variants'][k]['ms']['total']
                rows.append((f'kmeans K={k}, {entry["rows"]}x{entry["dim"]}', f'{entry[f"ms_k{k}"]:.1f} ms',
                             f'R2O step {step_ms:.0f}', f'{100 * frac:.1f}%',
                             '<= 10%' if on_step else '(info)', verdict(frac <= 0.10) if on_step else ''))
    if 'loop' in res:
        L = res['loop']
        rows.append((f'training loop, {L["workers"]} workers, K=4', f'{L["loop_img_s"]:.1f} img/s',
                     f'bench step {L["step_img_s"]:.1f}', f'{L["loop_over_step"]:.2f}x',
                     '>= 0.9x' if gpu else '(info)', verdict(L['loop_over_step'] >= 0.9) if gpu else ''))
    if 'batches' in res:
        B = res['batches']
        first = min(B)
        for b, e in B.items():
            rows.append((f'step img/s, batch {b}, --cluster-batch {e["cluster_batch"]}, K=128',
                         f'{e["img_s"]:.1f} img/s', f'batch {first}: {B[first]["img_s"]:.1f}',
                         f'{e["img_s"] / B[first]["img_s"]:.2f}x', '(info)', ''))
    for entry in res.get('flops', []):
        c = entry['config']
        name = f'{c["arch"]} {c["image_size"]}px b{c["batch_size"]}'
        rows.append((f'FLOPs: refinement\'s layer3 pass, {name}', f'{100 * entry["refinement_pass_over_byol"]:.1f}%',
                     f'BYOL step {entry["byol_tflop"]:.2f} TFLOP', '', '(info)', ''))
        for k in K_R2O:
            ratio = entry[f'r2o_k{k}_over_byol']
            rows.append((f'FLOPs: R2O step K={k}, every row through the heads, {name}',
                         f'{ratio:.3f}x', 'BYOL step', f'{ratio:.2f}x', '(info)', ''))
    if 'memory' in res:
        M = res['memory']
        key = 'step_peak_growth_mib'
        for k in K_R2O:
            rows.append((f'step peak memory K={k}', f'{M[k][key]:.0f} MiB', f'BYOL {M[1][key]:.0f}',
                         f'{M[k][key] / max(M[1][key], 1e-9):.2f}x', '(info)', ''))
    if 'superpixel_features' in res:
        P = res['superpixel_features']
        rows.append(('superpixel features: ours vs the reference\'s sampling, cosine mean / 1% / min',
                     f'{P["cosine_mean"]:.3f} / {P["cosine_p1"]:.3f} / {P["cosine_min"]:.3f}',
                     f'{100 * P["missed_by_reference"]:.1f}% missed by the reference', '', '(info)', ''))
    for P in res.get('masks', []):
        a, r = P['aligned'], P['reference_aligned_false']
        rows.append((f'masks, {P["maps"]} maps: worst cell vs exact, {P["boxes"]} boxes (median/p90/max)',
                     f'{a["median"]:.3f} / {a["p90"]:.3f} / {a["max"]:.3f}',
                     f'aligned=False {r["median"]:.3f} / {r["p90"]:.3f} / {r["max"]:.3f}', '', '(info)', ''))
    if 'blur' in res:
        G = res['blur']
        rows.append(('blur, 224 px view, 1 thread: reference\'s Gaussian, separable',
                     f'{G["ms_separable"]:.2f} ms', f'Pillow\'s approximation {G["ms_pillow"]:.2f}',
                     f'{G["separable_minus_pillow_ms"]:+.2f} ms', '<= Pillow + 0.5 ms',
                     verdict(G['separable_minus_pillow_ms'] <= 0.5)))
        rows.append(('blur: the same Gaussian as a 2-D 23 x 23 kernel', f'{G["ms_kernel2d"]:.1f} ms',
                     f'separable {G["ms_separable"]:.2f}', f'{G["kernel2d_over_separable"]:.1f}x slower',
                     '(info)', ''))
        rows.append(('blur: separable vs 2-D kernel, largest pixel difference',
                     f'{G["separable_vs_kernel2d_max_diff"]} grey level', '',
                     f'{100 * G["separable_vs_kernel2d_differing"]:.4f}% of values differ', '(info)', ''))
    if 'resample' in res:
        R = res['resample']
        rows.append(('resize of a crop box to 224 px, 1 thread: torch\'s uint8 kernel',
                     f'{R["ms_torch"]:.2f} ms', f'Pillow {R["ms_pillow"]:.2f}',
                     f'{R["pillow_over_torch"]:.1f}x faster', '(info)', ''))
        for kind in ('scenes', 'noise'):
            K = R[kind]
            rows.append((f'resize, {kind}: torch vs Pillow\'s two passes, largest difference',
                         f'{K["torch_vs_two_passes_max"]} grey levels', '',
                         f'{100 * K["torch_vs_two_passes_differing"]:.2f}% of values differ',
                         '<= 2', verdict(K['torch_vs_two_passes_max'] <= 2)))
    return rows


def print_table(rows):
    head = ('figure', 'value', 'baseline', 'ratio', 'target', '')
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print('  '.join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


def real_dim(res):
    return next(e['dim'] for name, e in res['kmeans'].items() if name.startswith('step size'))


def print_details(res):
    m = res['machine']
    print(f'machine: {m["cpu"]}, {m["cpu_count"]} cores, torch {m["torch"]} ({m["torch_threads"]} threads), '
          f'device {m["device"]}{" " + m["gpu"] if "gpu" in m else ""}; cores busy with other processes '
          f'at start {m["busy_cores_at_start"]}, at end {m["busy_cores_at_end"]} (load average '
          f'{m["load_average_at_start"][0]}, {m["load_average_at_end"][0]})')
    if 'loader' in res:
        L = res['loader']
        print(f'\n1. loader, one worker (1 thread), {L["images"]} {L["photos"]}, 224 px, 100 superpixels, '
              f'best of {L["rounds"]} interleaved passes, ms/sample:\n'
              f'   SLIC every sample (reference) {L["ms_per_sample_reference"]:.1f} | cached, epoch 2 (ours) '
              f'{L["ms_per_sample_cached"]:.1f} | no superpixels {L["ms_per_sample_no_superpixels"]:.1f} | '
              f'cached, epoch 1 (fills the cache) {L["ms_per_sample_first_epoch"]:.1f} | '
              f'cached with --resample pillow {L["ms_per_sample_cached_pillow_resampling"]:.1f} | '
              f'torchvision BYOL two views {L["ms_per_sample_torchvision_byol"]:.1f}\n'
              f'   SLIC share of the reference\'s sample: '
              f'{L["ms_per_sample_reference"] - L["ms_per_sample_no_superpixels"]:.1f} ms')
    if 'step' in res:
        S = res['step']
        c = S['config']
        print(f'\n2. training step: {c["arch"]}, {c["image_size"]} px, batch {c["batch_size"]}, '
              f'{c["superpixels"]} superpixels/image, {"bf16 autocast" if S["bf16"] else "fp32"}, '
              f'kmeans {S["kmeans_iters"]} iters; median of {S["steps"]} steps after {S["warmup"]}, ms:')
        for k, v in S['variants'].items():
            ms = v['ms']
            k = variant_name(k, m['device'].startswith('cuda'))
            print(f'   K={k:<4} total {ms["total"]:7.1f} = masks and loss {ms["loss"]:6.1f} + backward '
                  f'{ms["backward"]:6.1f} + LARS/EMA {ms["update"]:6.1f}; '
                  f'{v["mask_pairs_per_image"]:.1f} mask pairs/image')
        for k, error in S.get('errors', {}).items():
            print(f'   K={k}: could not run here: {error}')
        print('   masks_for_batch piece by piece: ' +
              ', '.join(f'{name} {ms:.1f}' for name, ms in S['refinement'].items()))
        if 'syncs' in S:
            print(f'   host syncs in one K=128 step: {S["syncs"]["count"]}; first: {S["syncs"]["first"]}')
    if 'kmeans' in res:
        arch = res['step']['config']['arch']
        note = ('' if arch == 'resnet50' else f' Part 2 ran {arch}, whose layer3 has '
                f'{real_dim(res)} channels, not resnet50\'s 1024: the paper-size row is set against '
                'that smaller step (informative only)')
        print(f'\n3. r2o.kmeans alone ({res["step"]["kmeans_iters"]} Lloyd iterations, median), ms and '
              f'fraction of the R2O step of part 2 at the same K. The step-size row is the k-means that '
              f'step runs, the one the target applies to.{note}')
        for name, e in res['kmeans'].items():
            if name.startswith('quality'):
                print(f'   {name}: inertia {e["inertia_greedy"]:.2f} (greedy k-means++ seeding, the '
                      f'default) vs {e["inertia_rounds"]:.2f} (--kmeans-seeding rounds), same Lloyd '
                      f'steps, ratio {e["ratio"]:.4f}; run to convergence (the reference\'s rule) '
                      f'{e["inertia_converged"]:.2f} after {e["steps_converged"]:.0f} steps; mean of '
                      f'{e["seeds"]} seeds; {e["ms_greedy"]:.1f} vs {e["ms_rounds"]:.1f} ms' +
                      (f'; {e["ops_greedy"]} vs {e["ops_rounds"]} tensor ops per call'
                       if 'ops_greedy' in e else ''))
                continue
            if name == 'deterministic sums':
                print(f'   {e["rows"]} x {e["dim"]}, K={e["k"]}: clusters summed with index_add_ '
                      f'{e["ms_index_add"]:.1f} ms, with a one-hot matrix product (--deterministic on a '
                      f'GPU) {e["ms_one_hot"]:.1f} ms')
                continue
            print(f'   {name}: ' + ', '.join(
                f'K={k} {e[f"ms_k{k}"]:.1f} ms ({100 * e[f"fraction_of_r2o_step_k{k}"]:.1f}%)' for k in K_R2O))
    if 'memory' in res:
        M = res['memory']
        print(f'\n4. peak memory ({M["method"]}), MiB:')
        for k in (*K_R2O, 1):
            print(f'   K={k:<4} ' + ', '.join(f'{n} {v:.0f}' for n, v in M[k].items()
                                         if n not in ('k', 'peak_reset')))
    if 'loop' in res:
        L = res['loop']
        print(f'\n6. r2o.train_one_epoch on JPEG scenes, {L["steps"]} steps, {L["workers"]} loader workers, '
              f'superpixels cached, K={L["k"]}: {L["loop_img_s"]:.1f} img/s against {L["step_img_s"]:.1f} '
              f'for the bench step alone ({100 * L["loop_over_step"]:.0f}%)')
    if 'batches' in res:
        print('\n7. whole step, K=128, k-means per 32 images: ' + ', '.join(
            f'batch {b} {e["ms"]:.0f} ms = {e["img_s"]:.1f} img/s' for b, e in res['batches'].items()))
    for entry in res.get('flops', []):
        c = entry['config']
        print(f'\n8. FLOPs of one step (forward + backward, counted on meta tensors), {c["arch"]}, '
              f'{c["image_size"]} px, batch {c["batch_size"]}: BYOL {entry["byol_tflop"]:.3f} TFLOP; the '
              f'refinement\'s target layer3 pass adds {100 * entry["refinement_pass_over_byol"]:.1f}%; '
              f'R2O with every row through the heads: K=4 {entry["r2o_k4_over_byol"]:.3f}x, '
              f'K=128 {entry["r2o_k128_over_byol"]:.3f}x BYOL')
    if 'superpixel_features' in res:
        P = res['superpixel_features']
        print(f'\n5. superpixel features ({P["superpixels"]} superpixels of {P["images"]} generated scenes, '
              f'untrained resnet50 layer3): ours (area-weighted) against the reference\'s (bilinear '
              f'resize of the one-hot): cosine mean {P["cosine_mean"]:.4f}, 1st percentile '
              f'{P["cosine_p1"]:.3f}, min {P["cosine_min"]:.3f}; {100 * P["missed_by_reference"]:.2f}% '
              'of the superpixels miss every sample of the reference (a zero row there)')
    for P in res.get('masks', []):
        print(f'\n5. masks against the exact area fractions: {P["boxes"]} crop boxes of {P["label_map"]} x '
              f'{P["label_map"]} label maps of {P["maps"]} (K={P["k"]}), {P["out_size"]} x {P["out_size"]} '
              'masks; the worst cell of each box, median / 90th percentile / max:')
        for name, label in (('aligned', 'r2o.view_masks (aligned=True)'),
                            ('reference_aligned_false', 'the reference (aligned=False)')):
            e = P[name]
            print(f'   {label}: {e["median"]:.3f} / {e["p90"]:.3f} / {e["max"]:.3f}')
    if 'blur' in res:
        G = res['blur']
        print(f'\n9. Gaussian blur of one {G["image_size"]} x {G["image_size"]} RGB view, one thread, median of '
              f'{G["calls"]} calls at sigma drawn in [0.1, 2.0], ms: Pillow\'s approximation (--blur pillow) '
              f'{G["ms_pillow"]:.2f} | the reference\'s {G["taps"]}-tap Gaussian, separable (data.gaussian_blur, '
              f'--blur gaussian) {G["ms_separable"]:.2f} | the same as a 2-D {G["taps"]} x {G["taps"]} kernel '
              f'(torchvision) {G["ms_kernel2d"]:.1f}\n'
              f'   separable vs 2-D: at most {G["separable_vs_kernel2d_max_diff"]} grey level apart, '
              f'{100 * G["separable_vs_kernel2d_differing"]:.4f}% of the values differ')
    if 'resample' in res:
        R = res['resample']
        print(f'\n11. resize of a crop box to 224 px, one thread, {R["boxes"]} boxes per image drawn as the loader '
              f'draws them on a {R["scene_size"]} px scene and on noise, median ms: torch\'s uint8 kernel '
              f'(--resample torch) {R["ms_torch"]:.2f} | Pillow {R["pillow"]} (--resample pillow) '
              f'{R["ms_pillow"]:.2f}')
        for kind in ('scenes', 'noise'):
            K = R[kind]
            print(f'   {kind}: torch vs Pillow\'s two passes (horizontal first): at most '
                  f'{K["torch_vs_two_passes_max"]} grey levels, {100 * K["torch_vs_two_passes_differing"]:.2f}% '
                  f'of values differ; Pillow {R["pillow"]}\'s own resize differs from those passes in '
                  f'{100 * K["pillow_own_differs_in_boxes"]:.0f}% of the boxes, by up to '
                  f'{K["pillow_own_vs_two_passes_max"]} grey levels')
    if 'vit' in res:
        V = res['vit']
        c = V['config']
        print(f'\n10. one step with a ViT ({c["arch"]}, {c["image_size"]} px, batch {c["batch_size"]}, '
              f'{c["superpixels"]} superpixels, AdamW, gradients clipped), median of {V["steps"]}, ms '
              '(loss incl. masks | backward | update + EMA | total):')
        for k, v in V['variants'].items():
            ms = v['ms']
            print(f'   {"BYOL (K=1)" if k == 1 else f"R2O K={k}":<11} {ms["loss"]:8.1f} {ms["backward"]:8.1f} '
                  f'{ms["update"]:7.1f} {ms["total"]:8.1f}  ({v["over_byol"]:.2f}x BYOL)')


def main(args):
    # the --deterministic variant needs cuBLAS's workspace setting before CUDA starts
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.memory_child is not None:
        return memory_child(args.memory_child, args.quick, device, args.kmeans_iters)
    parts = set(args.parts.split(','))
    unknown = parts - {'loader', 'step', 'kmeans', 'memory', 'masks', 'loop', 'batches', 'flops',
                       'blur', 'resample', 'vit'}
    if unknown:
        raise SystemExit(f'--parts: unknown {", ".join(sorted(unknown))}')
    if parts & {'kmeans', 'memory', 'loop'}:
        parts.add('step')                      # their fractions and batch come from part 2
    q = args.quick
    pick = lambda given, full, quick: given if given is not None else (quick if q else full)
    n_loader, n_boxes = pick(args.loader_images, 48, 3), pick(args.mask_boxes, 200, 20)
    res = dict(machine=machine_info(device), quick=q)
    m = res['machine']
    print(f'R2O benchmark on {m["cpu"]} ({m["cpu_count"]} cores), device {device}, '
          f'{m["busy_cores_at_start"]} cores busy with other processes', flush=True)
    start = time.perf_counter()
    res['part_s'] = {}

    def begin(name):
        res['part_s'][name] = time.perf_counter()
        print(f'{name} ...', flush=True)

    def end(name):
        res['part_s'][name] = round(time.perf_counter() - res['part_s'][name], 1)

    with tempfile.TemporaryDirectory(prefix='r2o-bench-') as tmp:
        tmp = Path(tmp)
        scene_parts = {'loop'} | ({'loader'} if args.loader_photos is None else set())
        if parts & scene_parts:
            begin('0. writing scenes')
            scenes = write_scenes(tmp / 'scenes', max(n_loader if 'loader' in parts else 0,
                                                      8 if 'loop' in parts else 0), args.scene_size)
            end('0. writing scenes')
        if 'loader' in parts:
            begin('1. loader')
            photos = scenes if args.loader_photos is None else photo_sample(args.loader_photos, n_loader,
                                                                             tmp / 'photos')
            res['loader'] = bench_loader(photos, tmp / 'cache', n_loader, pick(args.loader_rounds, 2, 1),
                                         device)
            res['loader']['photos'] = ('JPEG scenes' if args.loader_photos is None else
                                       f'photos from {args.loader_photos}')
            end('1. loader')
        if 'step' in parts:
            begin('2. training step')
            cfg = step_config(device, q)
            batch = step_batch(cfg, device)
            res['step'], model = bench_step(cfg, batch, device, args.kmeans_iters,
                                            pick(args.steps, 8, 1), pick(args.warmup, 2, 1))
            if device.type == 'cuda':
                res['step']['syncs'] = count_syncs(model, r2o.LARSForeach(r2o.lars_param_groups(model)),
                                                   batch, step_run(device, args.kmeans_iters), device)
            end('2. training step')
        if 'kmeans' in parts:
            begin('3. k-means')
            res['kmeans'] = bench_kmeans(model, batch, res['step'], device, q, args.kmeans_iters)
            end('3. k-means')
        if 'memory' in parts:
            begin('4. memory')
            del model
            res['memory'] = (bench_memory_gpu(cfg, batch, step_run(device, args.kmeans_iters), device)
                             if device.type == 'cuda' else bench_memory_cpu(args, device))
            end('4. memory')
        if 'masks' in parts:
            begin('5. masks')
            res['masks'] = [bench_masks(n_boxes, maps) for maps in ('superpixels', 'cells')]
            res['superpixel_features'] = bench_superpixel_features(4 if q else 32)
            end('5. masks')
        if 'loop' in parts:
            begin('6. training loop')
            res['loop'] = bench_loop(scenes, cfg, device, q, res['step']['variants'][4]['ms']['total'])
            end('6. training loop')
        if 'batches' in parts:
            begin('7. batch sizes')
            cfg = step_config(device, q)
            res['batches'] = bench_batches(cfg, device, q, args.kmeans_iters, pick(args.steps, 5, 1))
            end('7. batch sizes')
        if 'flops' in parts:
            begin('8. FLOPs')
            cfg = step_config(device, q)
            res['flops'] = [step_flops(c) for c in ([STEP_GPU] + [cfg] * (cfg != STEP_GPU))]
            end('8. FLOPs')
        if 'blur' in parts:
            begin('9. blur')
            res['blur'] = bench_blur(pick(args.blur_calls, 200, 20), args.scene_size)
            end('9. blur')
        if 'resample' in parts:
            begin('11. resampling')
            res['resample'] = bench_resample(pick(args.blur_calls, 200, 20), args.scene_size)
            end('11. resampling')
        if 'vit' in parts:
            begin('10. ViT step')
            cfg = dict(VIT_QUICK if q else VIT_GPU if device.type == 'cuda' else VIT_CPU)
            res['vit'] = bench_vit(cfg, device, args.kmeans_iters, pick(args.steps, 8, 1),
                                   pick(args.warmup, 2, 1))
            end('10. ViT step')
    res['machine']['load_average_at_end'] = [round(x, 2) for x in os.getloadavg()]
    res['machine']['busy_cores_at_end'] = busy_cores()
    res['wall_s'] = round(time.perf_counter() - start, 1)
    print()
    print_details(res)
    rows = summary_rows(res)
    res['table'] = [dict(zip(('figure', 'value', 'baseline', 'ratio', 'target', 'verdict'), r)) for r in rows]
    print(f'\nsummary ({res["wall_s"]} s: ' + ', '.join(f'{n} {t} s' for n, t in res['part_s'].items()) +
          f'){"; --quick: sizes too small to mean much" if q else ""}:')
    print_table(rows)
    busy = [m[key] for key in ('busy_cores_at_start', 'busy_cores_at_end') if m[key] is not None]
    if busy and max(busy) > 0.2:
        print(f'warning: other processes kept {max(busy)} cores busy: the timings are inflated and '
              'noisy; run again on a quiet machine')
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float) + '\n')
        print(f'figures saved to {args.json}')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
