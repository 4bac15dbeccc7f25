"""R2O: Region-to-Object representation learning (Gokul et al., arXiv 2208.11821).

BYOL with mask pooling, where the masks are re-derived every step by clustering superpixels
with the target encoder's own features, and the number of clusters K shrinks over training.

Try it (CPU, no data, about 3 minutes on 2 cores; writes runs/synthetic-cosine/):
    python r2o.py
One GPU:
    python r2o.py --data /path/to/imagenet
One node, 8 GPUs (the paper's per-GPU batch of 32, global 256, lr 0.3):
    torchrun --nproc_per_node=8 r2o.py --data /path/to/imagenet
The paper's global batch of 4096 on 8 large GPUs, k-means still over each 32 images:
    torchrun --nproc_per_node=8 r2o.py --data /path/to/imagenet --batch-size 512 --cluster-batch 32
Several nodes (run on each, with its --node_rank):
    torchrun --nnodes=4 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
        r2o.py --data /path/to/imagenet
Baselines: `--k-schedule constant --k-max 1 --no-lr-k-scale` is BYOL; `--k-schedule none` uses
the superpixels themselves as masks (DetCon-style).
"""
import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries
from torchvision.ops import roi_align

import data


# ================================ networks ================================

def build_encoder(arch='resnet50'):
    """A torchvision ResNet with fc replaced by identity (its state_dict is a torchvision one)."""
    if arch not in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'):
        raise ValueError(f'unknown --arch {arch}')
    net = getattr(torchvision.models, arch)()
    net.fc = nn.Identity()
    return net


def encoder_features(net, x, layer='layer4'):
    """Feature map of a torchvision ResNet up to `layer` ('layer3' or 'layer4').

    x: B x 3 x H x W -> B x C x H/16 x W/16 (layer3) or B x C x H/32 x W/32 (layer4).
    """
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer3(net.layer2(net.layer1(x)))
    return x if layer == 'layer3' else net.layer4(x)


def feature_dim(net, layer='layer4'):
    block = getattr(net, layer)[-1]
    return (block.bn3 if hasattr(block, 'bn3') else block.bn2).num_features


def mlp(in_dim, hidden_dim=4096, out_dim=256):
    """BYOL's projector / predictor: Linear, BatchNorm1d, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


# ================================ refinement: superpixels -> object masks ================================

def superpixel_pool(features, superpixels, n_superpixels=None):
    """Average features inside each superpixel.

    features: B x C x h x w; superpixels: B x M x M integer ids (M a multiple of h, e.g. 56 vs 14).
    Each superpixel's weight on a feature cell is the fraction of that cell it covers.
    Returns pooled B x S x C and area B x S (0 for ids absent from an image), S = max id + 1.
    """
    S = n_superpixels or int(superpixels.max()) + 1
    onehot = F.one_hot(superpixels, S).permute(0, 3, 1, 2).to(features.dtype)   # B S M M
    weights = F.adaptive_avg_pool2d(onehot, features.shape[-2:]).flatten(2)    # B S hw
    area = weights.sum(-1)
    pooled = weights @ features.flatten(2).transpose(1, 2)                     # B S C
    return pooled / area.clamp_min(1e-6)[..., None], area


def seeding_rounds(k):
    """How many centres each round of kmeans' seeding adds: half as many as there are already,
    after the first one (1, 1, 1, 2, 3, 4, 6, ... : 12 rounds for k=128)."""
    sizes, have = [], 1
    while have < k:
        sizes.append(min(max(1, have // 2), k - have))
        have += sizes[-1]
    return sizes


def kmeans(x, k, iters=30, generator=None, weight=None):
    """K-means of the rows of x (N x D) in fp32 on x's device: D^2 seeding in rounds, then a
    fixed number of Lloyd steps. Fixed work and no host sync, so a GPU never waits for Python.

    x may also be G x N x D: G independent problems solved by the same kernels, exactly as G
    calls in a row with one generator would solve them on a CPU (one launch per operation
    instead of G, which is what a GPU pays for at these sizes).

    Seeding: k-means++ draws k centres one by one, each with probability proportional to D(x)^2,
    the squared distance to the nearest centre so far. Here each round draws, without
    replacement, half as many new centres as there already are from that same distribution
    (seeding_rounds: 12 rounds instead of 128 sequential draws at k=128), with the inertia after
    the Lloyd steps within 0.3% of k-means++'s or lower (bench.py prints both). The draws are an
    exponential race: the m points with the largest p / E, E ~ Exp(1) drawn up front, are m draws
    without replacement in proportion to p. A cluster left empty by a Lloyd step restarts at a
    far point: empty cluster j takes the j-th farthest point from its own centroid, so no
    centroid is ever NaN.
    weight: optional N (or G x N) 0/1 floats; rows of weight 0 are ignored (never centres unless
    too few others, no pull on centroids) yet still get a label. Lets a caller keep fixed shapes
    instead of selecting rows.
    Returns labels (N,) int64 in [0, k) and centroids (k x D), with a leading G for 3-d x.
    k is capped at N.
    """
    batched = x.dim() == 3
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)   # a diverged net: no crash
    x = x if batched else x[None]
    G, n, D = x.shape
    k = min(k, n)
    w = torch.ones(G, n, device=x.device) if weight is None else weight.float().view(G, n)
    sq = (x * x).sum(-1)                                                   # G N

    def score(c):          # G x N x len(c): |c|^2 - 2 x.c, the squared distance less |x|^2
        return torch.baddbmm((c * c).sum(-1)[:, None], x, c.transpose(1, 2), alpha=-2)

    def rows(index):       # the rows of x at G x m indices: G x m x D
        return x.gather(1, index[..., None].expand(-1, -1, D))

    sizes = seeding_rounds(k)
    race = torch.empty(G, len(sizes) + 1, n, device=x.device).exponential_(generator=generator)
    race = w[:, None] / race                # weight-0 rows lose every race (key 0)
    picks = race[:, 0].argmax(1, keepdim=True)                                # G x 1
    closest = (score(rows(picks))[..., 0] + sq).clamp_min(0)
    for r, m in enumerate(sizes, 1):
        # + 1e-12: points equal to a centre keep a tiny chance, so m draws always exist
        new = ((closest + 1e-12) * race[:, r]).topk(m, dim=1).indices
        closest = torch.minimum(closest, (score(rows(new)).amin(-1) + sq).clamp_min(0))
        picks = torch.cat([picks, new], 1)
    centroids = rows(picks)                                                  # G k D

    wx = torch.cat([x * w[..., None], w[..., None]], -1).flatten(0, 1)   # rows and weights, summed at once
    sqw = sq * w
    first = (torch.arange(G, device=x.device) * k)[:, None]   # problem g's clusters: rows g*k...
    for _ in range(iters):
        nearest, labels = score(centroids).min(-1)
        sums = torch.zeros(G * k, D + 1, device=x.device).index_add_(
            0, (labels + first).flatten(), wx).view(G, k, D + 1)
        counts = sums[..., D:]
        # an empty cluster j restarts at the j-th farthest point from its own centroid
        farthest = torch.addcmul(sqw, nearest, w).topk(k, dim=1).indices
        centroids = torch.where(counts == 0, rows(farthest), sums[..., :D] / counts.clamp_min(1))
    labels = score(centroids).argmin(-1)
    return (labels, centroids) if batched else (labels[0], centroids[0])


@torch.no_grad()
def refine(features, superpixels, k, iters=30, generator=None, n_superpixels=None, group=None):
    """Cluster the superpixels of a whole batch into k object masks (R2O's refinement).

    features: B x C x h x w (the target encoder's layer3 on the raw view);
    superpixels: B x M x M ids below n_superpixels (give it, known on the host, to spare a GPU
    sync). Superpixel features are pooled, L2-normalised and clustered together across the
    batch (cluster ids mean the same thing in every image); ids absent from an image take no
    part (the reference clusters them as zero rows). Each cell of the M x M map then takes its
    superpixel's cluster. Returns labels B x M x M int64 in [0, k).
    group: cluster each run of this many images (B a multiple of it) on its own, all groups in
    one batched k-means.
    """
    B = features.shape[0]
    group = group or B
    if B % group:
        raise ValueError(f'a batch of {B} images does not split into groups of {group}')
    with torch.autocast(features.device.type, enabled=False):
        pooled, area = superpixel_pool(features.float(), superpixels, n_superpixels)
        S, C = pooled.shape[1:]
        cluster_of, _ = kmeans(F.normalize(pooled, dim=-1).view(-1, group * S, C), k, iters,
                               generator, (area > 0).float().view(-1, group * S))
    return cluster_of.view(B, S).gather(1, superpixels.flatten(1)).view_as(superpixels)


def view_masks(labels, boxes, flips, k, out_size):
    """Soft masks of one view: the label map cut to the view's crop box and flipped like it.

    labels: B x M x M ints in [0, k); boxes: B x 4 (x0, y0, x1, y1) normalised to the whole
    image; flips: B bools. Returns B x k x out_size^2; at every cell the k values sum to 1.
    roi_align with an adaptive sampling ratio (the reference's) and aligned=True: each cell holds
    the fraction of it that each cluster covers (the reference's aligned=False shifts the masks
    by half a cell).
    """
    B, M, _ = labels.shape
    onehot = F.one_hot(labels, k).permute(0, 3, 1, 2).float()                  # B k M M
    rois = torch.cat([torch.arange(B, device=labels.device, dtype=torch.float32)[:, None],
                      boxes.float() * M], 1)
    masks = roi_align(onehot, rois, out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    masks = torch.where(flips[:, None, None, None], masks.flip(-1), masks)
    return masks.flatten(2)


def mask_pool(features, masks, min_area=1.0):
    """Features B x C x h x w pooled under soft masks B x K x hw -> B x K x C.

    The feature sum under each mask divided by max(area, min_area), area in feature cells.
    min_area=1 is the reference's: a mask smaller than one cell is summed, not averaged, and an
    empty mask pools to a zero row. A tiny min_area gives the plain masked average.
    """
    masks = masks.to(features.dtype)
    area = masks.sum(-1, keepdim=True).clamp_min(min_area)
    return (masks @ features.flatten(2).transpose(1, 2)) / area


def mask_overlap(masks1, masks2, min_area=1e-3):
    """The overlap indicator: B x K bools, True where a mask's area (the sum of its cells, in
    feature cells) exceeds `min_area` in both views. Only these (image, mask) pairs enter the
    loss. 1e-3 is the reference's: any trace of the mask in both views."""
    return (masks1.sum(-1) > min_area) & (masks2.sum(-1) > min_area)


def mlp_with_counts(mlp, x, counts):
    """An mlp (Linear, BatchNorm1d, ReLU, Linear) on a batch whose row i stands for counts[i]
    identical rows: the outputs, gradients and BatchNorm running statistics of the repeated
    batch (the statistics are weighted by the counts), at the cost of the distinct rows only."""
    linear1, bn, relu, linear2 = mlp
    if isinstance(bn, nn.SyncBatchNorm):
        raise ValueError('mlp_with_counts computes the statistics of this process only')
    h = linear1(x)
    if bn.training:
        n = counts.sum()
        share = (counts / n)[:, None]
        mean = (share * h).sum(0)
        var = (share * (h - mean) ** 2).sum(0)
        with torch.no_grad():
            bn.num_batches_tracked += 1
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * n / (n - 1), bn.momentum)       # unbiased, as BatchNorm
    else:
        mean, var = bn.running_mean, bn.running_var
    return linear2(relu((h - mean) * torch.rsqrt(var + bn.eps) * bn.weight + bn.bias))


def byol_loss(prediction, target, weight=None):
    """BYOL's regression loss 2 - 2 cos(prediction, target) over rows (N x D): the mean, or the
    mean over the rows where `weight` (N,) is 1 when a 0/1 weight is given."""
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target.float(), dim=-1)
    loss = 2 - 2 * (p * z).sum(-1)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1)


class R2O(nn.Module):
    """Online encoder + projector + predictor, and the target (EMA) encoder + projector.

    forward(view1, view2, masks1, masks2) returns the mask-level BYOL loss, (L12 + L21) / 2 with
    each term the mean over the (image, mask) pairs present in both views, and the number of
    such pairs (a tensor: reading it would wait for the GPU).

    head_rows: 'all' (the reference) sends every pooled row, empty masks included, through the
    projector and predictor, so their BatchNorm statistics see the empty rows, and masks the
    loss afterwards; 'overlap' sends only the pairs present in both views.
    pool_min_area: see mask_pool (1, the reference's; 1e-6 for the plain average).
    merge_empty_rows: with head_rows 'all', compute the heads once for all empty masks, which
    pool to identical zero rows (mlp_with_counts): the same loss, gradients and statistics at
    a fraction of the cost where most of the B x K masks are empty (K=128). None: on a CPU only,
    as on a GPU selecting rows waits for the device and the full rows cost little there.
    """

    def __init__(self, arch='resnet50', hidden_dim=4096, out_dim=256, min_mask_area=1e-3,
                 head_rows='all', pool_min_area=1.0, merge_empty_rows=None):
        super().__init__()
        if head_rows not in ('all', 'overlap'):
            raise ValueError(f'unknown head_rows {head_rows}')
        self.encoder = build_encoder(arch)
        dim = feature_dim(self.encoder)
        self.projector = mlp(dim, hidden_dim, out_dim)
        self.predictor = mlp(out_dim, hidden_dim, out_dim)
        self.target_encoder = build_encoder(arch)
        self.target_projector = mlp(dim, hidden_dim, out_dim)
        self.min_mask_area = min_mask_area
        self.head_rows = head_rows
        self.pool_min_area = pool_min_area
        self.merge_empty_rows = merge_empty_rows
        for online, target in self.online_target_pairs():
            target.load_state_dict(online.state_dict())
            target.requires_grad_(False)

    def online_target_pairs(self):
        return ((self.encoder, self.target_encoder), (self.projector, self.target_projector))

    def forward(self, view1, view2, masks1, masks2):
        valid = mask_overlap(masks1, masks2, self.min_mask_area)               # B x K
        views, masks = torch.cat([view1, view2]), torch.cat([masks1, masks2])
        merge = self.merge_empty_rows
        if merge is None:
            merge = views.device.type == 'cpu'
        keep = counts = None
        if self.head_rows == 'overlap':
            keep = valid.repeat(2, 1).flatten()
        elif merge:
            keep = masks.sum(-1).flatten() > 0                # the rows that are not all zero
            counts = torch.cat([torch.ones(int(keep.sum()), device=views.device),
                                (~keep).sum()[None].float()])
            # row r of the 2B x K rows is compact row back[r]; every empty row is the last one
            back = torch.where(keep, keep.cumsum(0) - 1, counts.numel() - 1)

        def heads(pooled, *mlps):              # both views together, as one batch for BatchNorm
            if counts is not None:             # the non-empty rows, then one zero row for the rest
                pooled = torch.cat([pooled[keep], pooled.new_zeros(1, pooled.shape[1])])
            elif keep is not None:
                pooled = pooled[keep]
            for m in mlps:
                pooled = m(pooled) if counts is None else mlp_with_counts(m, pooled, counts)
            return pooled if counts is None else pooled[back]

        def pool(encoder):
            return mask_pool(encoder_features(encoder, views), masks, self.pool_min_area).flatten(0, 1)

        p1, p2 = heads(pool(self.encoder), self.projector, self.predictor).chunk(2)
        with torch.no_grad():
            z1, z2 = heads(pool(self.target_encoder), self.target_projector).chunk(2)
        weight = None if self.head_rows == 'overlap' else valid.flatten().float()
        loss = (byol_loss(p1, z2, weight) + byol_loss(p2, z1, weight)) / 2
        return loss, valid.sum()


@torch.no_grad()
def ema_update(model, momentum, buffers=False):
    """target = momentum * target + (1 - momentum) * online, over the parameters (the
    reference's); with buffers=True also over the BatchNorm running statistics (the target's
    own are otherwise those of its forward passes)."""
    for online, target in model.online_target_pairs():
        if buffers:
            pairs = list(zip(target.state_dict().values(), online.state_dict().values()))
        else:
            pairs = list(zip(target.parameters(), online.parameters()))
        floats = [(t, o) for t, o in pairs if t.dtype.is_floating_point]
        torch._foreach_lerp_([t for t, _ in floats], [o for _, o in floats], 1 - momentum)
        for t, o in pairs:
            if not t.dtype.is_floating_point:
                t.copy_(o)


# ================================ schedules ================================

def k_schedule(epoch, epochs, kind='cosine', k_max=128, k_min=4):
    """Number of clusters K for `epoch` (counted from 1 to `epochs`), or None for 'none'
    (the superpixels themselves are the masks).

    cosine (R2O's default): int(k_min + (k_max - k_min) * cos(pi/2 * epoch/epochs)), 128 -> 4;
    linear: from k_max down to k_min; constant: k_max (k_max=1 is BYOL).
    """
    if kind == 'none':
        return None
    if kind == 'constant':
        return k_max
    t = epoch / epochs
    if kind == 'cosine':
        return int(k_min + (k_max - k_min) * math.cos(math.pi / 2 * t))
    if kind == 'linear':
        return int(round(k_max - (k_max - k_min) * t))
    raise ValueError(f'unknown K schedule {kind}')


def learning_rate(step, total_steps, warmup_steps, base_lr):
    """Linear warmup from 0 over warmup_steps, then cosine to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def ema_momentum(step, total_steps, base=0.99):
    """Target EMA momentum, from `base` at step 0 to 1 at the end, on a cosine."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


# ================================ optimizer ================================

class LARS(torch.optim.Optimizer):
    """LARS (You et al.) with SGD momentum, as the reference computes it: the learning rate and
    the trust ratio go into the momentum buffer,

        buf = momentum * buf + lr * trust * (grad + weight_decay * w),   w -= buf,
        trust = trust_coefficient * |w| / (|grad| + weight_decay * |w|),

    so a change of lr (warmup, the K/16 scaling) acts on new gradients only. Groups with
    lars_exclude=True (biases and BatchNorm) take buf = momentum * buf + lr * grad: no trust
    ratio, no weight decay. All tensors of a group are updated together (torch._foreach)."""

    def __init__(self, params, lr=0.0, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            params = [p for p in g['params'] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p)
                bufs.append(state['momentum_buffer'])
            if g['lars_exclude']:
                updates = torch._foreach_mul(grads, g['lr'])
            else:
                wd = g['weight_decay']
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                # a zero weight or gradient (never at init) takes a plain step instead of 0/0
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    g['trust_coefficient'] * w_norm / (g_norm + wd * w_norm),
                                    torch.ones_like(w_norm))
                updates = torch._foreach_add(grads, params, alpha=wd)
                torch._foreach_mul_(updates, list((trust * g['lr']).unbind()))
            torch._foreach_mul_(bufs, g['momentum'])
            torch._foreach_add_(bufs, updates)
            torch._foreach_sub_(params, bufs)


def lars_param_groups(module):
    """Two groups: weights (LARS + weight decay) and biases + every BatchNorm parameter (neither).

    Only parameters that require grad (the online networks) are included."""
    regular, excluded = [], []
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_bn = isinstance(m, nn.modules.batchnorm._NormBase)
            (excluded if is_bn or name == 'bias' else regular).append(p)
    return [dict(params=regular), dict(params=excluded, weight_decay=0.0, lars_exclude=True)]


# ================================ arguments ================================

# Defaults that depend on the data: the paper's settings for a real dataset, a small preset for
# the built-in generated scenes (about 4 minutes on 2 CPU cores). A flag given explicitly wins.
PAPER = dict(arch='resnet50', image_size=224, epochs=300, batch_size=32, lr=0.3,
             superpixels=100, slic_compactness=10.0, slic_sigma=0.0, k_max=128, k_min=4,
             warmup_epochs=3, workers=8, save_every=25, vis_every=10, print_freq=50)
DEMO = dict(arch='resnet18', image_size=64, epochs=8, batch_size=32, lr=2.4, superpixels=24,
            slic_compactness=30.0, slic_sigma=1.0, k_max=32, k_min=4, warmup_epochs=1,
            workers=2, save_every=4, vis_every=1, print_freq=8, synthetic_images=640)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None (data-dependent: the help text says it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description='R2O pretraining', add_help=add_help,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data', default='synthetic',
                   help='an image folder (PATH/train is used if it exists: ImageNet; or any folder '
                        'of images, searched recursively: COCO), or "synthetic" for generated scenes')
    g.add_argument('--synthetic-images', type=int, default=None,
                   help='number of generated scenes per epoch with --data synthetic (preset 640)')
    g.add_argument('--image-size', type=int, default=None,
                   help='training resolution (224; synthetic preset 64). Masks live at image-size/4')
    g.add_argument('--superpixels', type=int, default=None,
                   help='SLIC n_segments per image (100; synthetic preset 24)')
    g.add_argument('--slic-compactness', type=float, default=None,
                   help='SLIC compactness (10, scikit-image\'s default; synthetic preset 30: its '
                        'strong textures fragment SLIC at 10)')
    g.add_argument('--slic-sigma', type=float, default=None,
                   help='SLIC Gaussian pre-smoothing (0; synthetic preset 1)')
    g.add_argument('--slic-input', default='rgb', choices=['rgb', 'normalized'],
                   help='what SLIC sees: the RGB image, or (as the reference code) the mean/std '
                        'normalised one')
    g.add_argument('--slic-size', type=int, default=None,
                   help='run SLIC on the whole image resized to this size (default: --image-size)')
    g.add_argument('--superpixel-cache', default='runs/superpixel-cache',
                   help='folder for the per-dataset superpixel cache (computed once, reused every '
                        'epoch and by every run on the same data); "none" recomputes SLIC every time')
    g.add_argument('--flip-p', type=float, default=0.5,
                   help='horizontal flip probability per view (the reference code flips always: 1.0)')
    g.add_argument('--blur', default='pillow', choices=['pillow', 'kernel23'],
                   help='Gaussian blur of the views: Pillow\'s box-filter approximation, or a true '
                        'Gaussian with a 23 x 23 kernel as the reference (several times slower in '
                        'the loader)')
    g.add_argument('--workers', type=int, default=None, help='loader processes per GPU (8; preset 2)')
    g.add_argument('--max-bad-fraction', type=float, default=0.01,
                   help='stop if more than this fraction of the images read so far are unreadable')

    g = p.add_argument_group('model')
    g.add_argument('--arch', default=None, help='resnet18/34/50/101/152 (resnet50; preset resnet18)')
    g.add_argument('--hidden-dim', type=int, default=4096, help='projector/predictor hidden size')
    g.add_argument('--out-dim', type=int, default=256, help='projection size')
    g.add_argument('--min-mask-area', type=float, default=1e-3,
                   help='a mask counts as present in a view when its area, in final feature cells '
                        '(7 x 7 = 49 at 224 px), exceeds this; only masks present in both views '
                        'enter the loss (the reference\'s 1e-3: any trace of the mask)')
    g.add_argument('--head-rows', default='all', choices=['all', 'overlap'],
                   help='which pooled masks go through projector and predictor: all of them, empty '
                        'ones as zero rows, the loss masked afterwards (the reference: BatchNorm '
                        'statistics include the empty rows), or only the pairs present in both views '
                        '(BatchNorm statistics of those pairs alone)')
    g.add_argument('--mask-pool', default='reference', choices=['reference', 'average'],
                   help='pool a mask\'s features as their sum / max(area, 1 cell) (the reference: '
                        'masks under one cell are summed) or as the masked average')

    g = p.add_argument_group('masks and the K curriculum')
    g.add_argument('--k-schedule', default='cosine', choices=['cosine', 'linear', 'constant', 'none'],
                   help='how K shrinks over epochs; "constant" keeps --k-max (with --k-max 1 this is '
                        'BYOL); "none" uses the superpixels themselves as masks (DetCon-style)')
    g.add_argument('--k-max', type=int, default=None, help='K at the start (128; preset 32)')
    g.add_argument('--k-min', type=int, default=None, help='K at the end (4)')
    g.add_argument('--kmeans-iters', type=int, default=30,
                   help='Lloyd iterations per step, fixed (the reference runs to convergence, cap 200)')
    g.add_argument('--cluster-batch', type=int, default=None,
                   help='k-means over each group of this many images on its own (default: the '
                        'whole per-GPU batch); the target encoder still sees the whole batch. The '
                        'paper clusters 32 images per GPU: with a larger --batch-size on a large '
                        'GPU, --cluster-batch 32 keeps that')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=None, help='epochs (300; preset 8)')
    g.add_argument('--batch-size', type=int, default=None,
                   help='images per GPU/process (32). k-means clusters one per-GPU batch, so keep '
                        'this fixed and scale the number of GPUs')
    g.add_argument('--lr', type=float, default=None,
                   help='base learning rate for a global batch of 256, scaled linearly (0.3; '
                        'synthetic preset 2.4: its 160 steps at batch 32 barely move LARS-scaled '
                        'weights at 0.3)')
    g.add_argument('--lr-k-scale', action=argparse.BooleanOptionalAction, default=True,
                   help='multiply the lr by K/16 with the epoch\'s K (the reference\'s default)')
    g.add_argument('--warmup-epochs', type=float, default=None, help='linear lr warmup (3; preset 1)')
    g.add_argument('--weight-decay', type=float, default=1e-6, help='LARS weight decay')
    g.add_argument('--ema', type=float, default=0.99, help='target EMA momentum at the start (-> 1)')
    g.add_argument('--ema-buffers', action='store_true',
                   help='also average the BatchNorm running statistics into the target (the '
                        'reference averages parameters only; its target keeps the statistics of '
                        'its own forward passes). Matters for eval_cub.py --encoder target')

    g = p.add_argument_group('run')
    g.add_argument('--output-dir', default=None,
                   help='where checkpoints, logs and pictures go (runs/<data>-<k-schedule>); a '
                        'checkpoint.pt already there is resumed')
    g.add_argument('--resume', default=None, help='continue from this checkpoint.pt')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--save-every', type=int, default=None,
                   help='keep a copy of the checkpoint every N epochs (25; preset 4)')
    g.add_argument('--vis-every', type=int, default=None,
                   help='write a mask picture every N epochs (10; preset 1)')
    g.add_argument('--print-freq', type=int, default=None, help='progress line every N steps')
    g.add_argument('--stop-after', type=int, default=None,
                   help='stop after this many epochs in this run (to fit a job time limit); '
                        'start again with the same command to continue')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=True,
                   help='bf16 autocast where the device supports it (never on CPU)')
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    return p


def resolve_args(args):
    """Fill the data-dependent defaults and derived names. Returns args."""
    preset = DEMO if args.data == 'synthetic' else PAPER
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        name = 'synthetic' if args.data == 'synthetic' else Path(args.data).resolve().name
        sched = args.k_schedule + (str(args.k_max) if args.k_schedule == 'constant' else '')
        args.output_dir = str(Path('runs') / f'{name}-{sched}')
    if args.image_size % 32:
        raise data.DataError(f'--image-size must be a multiple of 32 (got {args.image_size})')
    group = args.cluster_batch
    if group is not None and (group < 1 or args.batch_size % group):
        raise data.DataError(f'--batch-size {args.batch_size} is not a multiple of --cluster-batch '
                             f'{args.cluster_batch}')
    return args


def build_model(args):
    pool_min_area = 1.0 if args.mask_pool == 'reference' else 1e-6
    return R2O(args.arch, args.hidden_dim, args.out_dim, args.min_mask_area, args.head_rows,
               pool_min_area)


# ================================ distributed ================================

def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: then one process per GPU (NCCL) or per CPU
    process (gloo). Plain `python r2o.py` runs one process with no process group."""
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    rank = int(os.environ.get('RANK', 0))
    world = int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda':
        torch.cuda.set_device(local_rank)
        device = f'cuda:{local_rank}'
    if ddp:
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return ddp, rank, world, torch.device(device)


def params_in_sync(model, world):
    """Largest difference of any online parameter between ranks (0.0 when they are identical)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])
    if world == 1:
        return 0.0
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return (hi - lo).max().item()


# ================================ checkpoints ================================

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = Path(str(path) + '.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


# Flags a resumed run may change: where and how it runs, not what a step computes; --lr and
# --amp too, the way out of a diverged run. Every other flag must match the checkpoint's.
FREE_ON_RESUME = ('output_dir', 'resume', 'stop_after', 'save_every', 'vis_every', 'print_freq',
                  'workers', 'superpixel_cache', 'max_bad_fraction', 'device', 'amp', 'lr')


def load_checkpoint(path, model, optimizer, args):
    """Restore model and optimizer; returns (epochs done, steps done). Nothing else is needed
    to continue exactly: every random draw of a step depends on (seed, epoch, step) alone.

    A file that cannot be read, or was made with other settings, stops the run with one line."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign: all mean "unreadable"
        kept = sorted(Path(path).parent.glob('checkpoint-epoch*.pt'))
        hint = (f'continue from a kept one with --resume ({", ".join(map(str, kept))})' if kept
                else 'no kept checkpoint-epochNNNN.pt is there to continue from')
        raise data.DataError(f'{path} cannot be read ({type(e).__name__}: damaged or truncated?). '
                             f'Start afresh with another --output-dir, or {hint}') from None
    if not isinstance(ckpt, dict) or not {'model', 'optimizer', 'args', 'epoch'} <= set(ckpt):
        raise data.DataError(f'{path} is not an R2O training checkpoint')
    differ = [f'--{k.replace("_", "-")} {v} (now {getattr(args, k)})'   # flags of this version
              for k, v in ckpt['args'].items()
              if k not in FREE_ON_RESUME and hasattr(args, k) and v != getattr(args, k)]
    if differ:
        raise data.DataError(f'{path} was made with other settings: {", ".join(differ)}. '
                             'Give the same flags, or another --output-dir to start afresh.')
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    return ckpt['epoch'], ckpt['step']


def export_backbone(model, path):
    """The online encoder as a plain torchvision ResNet state_dict (only fc.* absent)."""
    save_atomic({k: v.cpu() for k, v in model.encoder.state_dict().items()}, path)


# ================================ pictures ================================

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                    [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]],
                   dtype=np.uint8)


def colorize(labels, size):
    """Integer label map -> size x size x 3 colours (nearest upsampling)."""
    idx = (np.arange(size) * labels.shape[0] // size)
    lab = labels[idx][:, idx]
    colors = PALETTE[lab % len(PALETTE)].astype(np.int32)
    # beyond the palette, vary brightness so different ids stay distinguishable
    shade = 1.0 - 0.35 * ((lab // len(PALETTE)) % 3)[..., None]
    return (colors * shade).astype(np.uint8)


def picture_indices(n_images, count=8):
    """Which images the mask pictures show: `count` spread evenly over the dataset (its first
    images would be one class of ImageNet's sorted folders), the same all run long."""
    return sorted({int(i) for i in np.linspace(0, n_images - 1, count).round()})


def mask_picture(images, superpixels, labels, path, title, scale=3):
    """PNG grid: one row per image: image | superpixels | refined masks (over the image)."""
    size = images[0].shape[0] * scale
    rows = []
    for img, sp, lab in zip(images, superpixels, labels):
        img = np.kron(img, np.ones((scale, scale, 1), np.uint8))
        idx = np.arange(size) * sp.shape[0] // size
        edges = find_boundaries(sp[idx][:, idx], mode='inner')
        sp_view = img.copy()
        sp_view[edges] = (255, 255, 0)
        masks = (0.45 * img + 0.55 * colorize(lab, size)).astype(np.uint8)
        gap = np.full((size, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([img, gap, sp_view, gap, masks], 1))
    grid = np.concatenate([np.concatenate([r, np.full((4, r.shape[1], 3), 255, np.uint8)])
                           for r in rows])
    header = np.full((18, grid.shape[1], 3), 255, np.uint8)
    pic = Image.fromarray(np.concatenate([header, grid]))
    ImageDraw.Draw(pic).text((4, 3), title + '   (image | superpixels | masks)', fill=(0, 0, 0))
    pic.save(path)


@torch.no_grad()
def visualize(model, vis, k, args, device, path, title):
    """Refine the fixed picture batch with the current target encoder and draw it (rank 0).

    Every rank runs it (SyncBatchNorm needs all of them) on a copy of the encoder, with its
    own generator, so training state and random streams are untouched."""
    raw, sp = vis['raw'].to(device), vis['superpixels'].to(device)
    if k is None:
        labels = sp
    else:
        encoder = copy.deepcopy(model.target_encoder)
        g = torch.Generator(device=device).manual_seed(0)
        labels = refine(encoder_features(encoder, raw, 'layer3'), sp, k, args.kmeans_iters, g)
    if path is not None:
        mask_picture([data.denormalize(x) for x in raw.cpu()], sp.cpu().numpy(),
                     labels.cpu().numpy(), path, title)


# ================================ one epoch ================================

def step_generator(args, rank, step, device):
    """The generator for one step's k-means seeding, seeded by (seed, rank, step) alone: a
    resumed run draws exactly what an uninterrupted one would, whatever the process (loader
    workers, earlier epochs) drew from the global random streams before."""
    return torch.Generator(device=device).manual_seed(
        (args.seed * 1_000_003 + rank) * 1_000_000_007 + step)


def masks_for_batch(model, batch, k, args, generator=None):
    """Both views' soft masks for a batch: refine (k a number), superpixels (k None) or whole
    crops (k == 1). Returns masks1, masks2 (B x K x g^2) and K.

    With args.cluster_batch smaller than the batch, k-means clusters each group of that many
    images on its own, as the paper's 32 images per GPU: one GPU with batch 256 and
    --cluster-batch 32 computes what 8 GPUs with batch 32 compute, the target encoder's
    BatchNorm statistics included (one forward over the whole batch here, SyncBatchNorm over
    the 8 GPUs there)."""
    sp = batch['superpixels']
    if k is None:
        labels, k = sp, batch['n_superpixels']
    elif k == 1:
        labels = torch.zeros_like(sp)          # one mask = the whole crop: plain BYOL
    else:
        features = encoder_features(model.target_encoder, batch['raw'], 'layer3')
        labels = refine(features, sp, k, args.kmeans_iters, generator, batch['n_superpixels'],
                        args.cluster_batch)
    g = args.image_size // 32                  # final feature map size (7 at 224)
    boxes, flips = batch['boxes'], batch['flips']
    return (view_masks(labels, boxes[:, 0], flips[:, 0], k, g),
            view_masks(labels, boxes[:, 1], flips[:, 1], k, g), k)


BATCH_TENSORS = ('view1', 'view2', 'raw', 'superpixels', 'boxes', 'flips')


def batch_to_device(batch, device, channels_last=False):
    """Copy a loader batch to `device` without waiting for the copy (pinned memory on CUDA), and
    note its number of superpixel ids while it is still on the host."""
    batch['n_superpixels'] = int(batch['superpixels'].max()) + 1
    for name in BATCH_TENSORS:
        batch[name] = batch[name].to(device, non_blocking=True)
        if channels_last and batch[name].dim() == 4:
            batch[name] = batch[name].contiguous(memory_format=torch.channels_last)
    return batch


def batches_on_device(loader, device, channels_last=False):
    """The loader's batches on `device`, each one's copy queued before the previous step's
    work, so the GPU never waits for a host-to-device copy."""
    ahead = None
    for batch in loader:
        batch = batch_to_device(batch, device, channels_last)
        if ahead is not None:
            yield ahead
        ahead = batch
    if ahead is not None:
        yield ahead


def train_one_epoch(model, ddp_model, loader, optimizer, epoch, step, args, run):
    """One pass over the loader. `run` holds the run-wide constants (device, sizes, schedules).
    Returns the step count and a dict of epoch statistics.

    Loss and mask counts add up on the device and are read only for a progress line, so the
    host never waits for the GPU within a step; a non-finite loss is caught there, before the
    epoch's checkpoint is written."""
    device = run['device']
    k = k_schedule(epoch + 1, args.epochs, args.k_schedule, args.k_max, args.k_min)
    lr_scale = k / 16 if (args.lr_k_scale and k is not None) else 1.0
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if run['bf16'] else nullcontext())
    model.train()
    n_steps = len(loader)
    sums = torch.zeros(2, dtype=torch.float64, device=device)     # loss, mask pairs
    seen, bad, checked = 0, [], 0
    start = time.time()
    for it, batch in enumerate(batches_on_device(loader, device, run['channels_last'])):
        lr = learning_rate(step, run['total_steps'], run['warmup_steps'], run['base_lr']) * lr_scale
        momentum = ema_momentum(step, run['total_steps'], args.ema)
        for group in optimizer.param_groups:
            group['lr'] = lr
        with autocast:
            masks1, masks2, k_used = masks_for_batch(
                model, batch, k, args, step_generator(args, run['rank'], step, device))
            loss, n_pairs = ddp_model(batch['view1'], batch['view2'], masks1, masks2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(model, momentum, args.ema_buffers)
        step += 1
        sums += torch.stack([loss.detach().double(), n_pairs.double()])

        seen += batch['view1'].shape[0]
        for name in batch['bad']:
            print(f'[rank {run["rank"]}] unreadable image skipped: {name}', flush=True)
        bad += batch['bad']
        if len(bad) > args.max_bad_fraction * seen and (seen >= 200 or it + 1 == n_steps):
            raise data.DataError(
                f'{len(bad)} of {seen} images read so far are unreadable (over --max-bad-fraction '
                f'{args.max_bad_fraction}), e.g. ' + '; '.join(bad[:5]))

        if (it + 1) % args.print_freq == 0 or it + 1 == n_steps:
            loss_sum, pairs_sum = sums.tolist()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f'loss is {loss_sum} in epoch {epoch + 1} between steps {checked + 1} and '
                    f'{it + 1}: stopping. The last good checkpoint (end of epoch {epoch}) in '
                    f'{args.output_dir} is untouched; try a lower --lr or --no-amp')
            checked = it + 1
            if run['rank'] == 0:
                elapsed = time.time() - start
                per_step = elapsed / (it + 1)
                left_epoch = per_step * (n_steps - it - 1)
                left_run = left_epoch + per_step * n_steps * (run['last_epoch'] - epoch - 1)
                print(f'epoch {epoch + 1}/{args.epochs} [{it + 1:>{len(str(n_steps))}}/{n_steps}] '
                      f'loss {loss_sum / (it + 1):.4f} K {k_used} lr {lr:.4g} ema {momentum:.5f} '
                      f'masks/img {pairs_sum / seen:.1f} {seen * run["world"] / elapsed:.1f} img/s '
                      f'eta epoch {fmt_time(left_epoch)} run {fmt_time(left_run)}', flush=True)

    stats = torch.cat([sums, torch.tensor([seen, n_steps, len(bad)], dtype=torch.float64,
                                          device=device)])
    if run['world'] > 1:
        dist.all_reduce(stats)
    elapsed = time.time() - start
    return step, dict(epoch=epoch + 1, loss=stats[0].item() / stats[3].item(),
                      k=k if k is not None else 'superpixels', lr=lr, ema_momentum=momentum,
                      masks_per_image=stats[1].item() / stats[2].item(),
                      images_per_s=stats[2].item() / elapsed, time_s=round(elapsed, 1),
                      unreadable_images=int(stats[4].item()))


def fmt_time(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


# ================================ main ================================

def build_dataset(args):
    cache = None if args.superpixel_cache == 'none' else args.superpixel_cache
    common = dict(image_size=args.image_size, n_segments=args.superpixels, slic_size=args.slic_size,
                  slic_compactness=args.slic_compactness, slic_sigma=args.slic_sigma,
                  slic_input=args.slic_input,
                  flip_p=args.flip_p, blur=args.blur, cache_dir=cache, seed=args.seed)
    if args.data == 'synthetic':
        return data.SyntheticDataset(n_images=args.synthetic_images,
                                     scene_size=2 * args.image_size, **common)
    return data.ImageFolderDataset(args.data, **common)


def build_loader(dataset, args, rank, world, device):
    """This rank's shard of a seeded, per-epoch shuffle, in batches of args.batch_size."""
    sampler = data.EpochSampler(torch.utils.data.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=data.collate, pin_memory=device.type == 'cuda', drop_last=True,
        persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise data.DataError(f'{len(dataset)} images are fewer than one batch of '
                             f'{args.batch_size} x {world} processes')
    return sampler, loader


def run_constants(args, rank, world, device, steps_per_epoch):
    """What train_one_epoch needs besides the model and data: device, schedule lengths, lr."""
    return dict(device=device, rank=rank, world=world, total_steps=args.epochs * steps_per_epoch,
                warmup_steps=int(args.warmup_epochs * steps_per_epoch),
                base_lr=args.lr * args.batch_size * world / 256, channels_last=device.type == 'cuda',
                bf16=args.amp and device.type == 'cuda' and torch.cuda.is_bf16_supported(),
                last_epoch=args.epochs)


def main(args):
    resolve_args(args)
    ddp, rank, world, device = setup_distributed(args)
    torch.manual_seed(args.seed)                # the same initial weights on every rank
    output_dir = Path(args.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        print('settings:\n' + '\n'.join(f'  {k}: {v}' for k, v in sorted(vars(args).items())),
              flush=True)

    # ===== preparing data =====
    dataset = build_dataset(args)
    sampler, loader = build_loader(dataset, args, rank, world, device)
    vis = data.collate([dataset[(0, i)] for i in picture_indices(len(dataset))])

    # ===== building networks and optimizer =====
    model = build_model(args).to(device)
    if ddp and device.type == 'cuda':      # SyncBatchNorm needs GPUs; gloo ranks keep plain BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    run = run_constants(args, rank, world, device, len(loader))
    if run['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model), weight_decay=args.weight_decay)

    # ===== schedules =====
    steps_per_epoch = len(loader)
    global_batch = args.batch_size * world
    if rank == 0:
        print(f'{len(dataset)} images, {world} process(es) x batch {args.batch_size} = global '
              f'{global_batch}, {steps_per_epoch} steps/epoch, lr {run["base_lr"]:.4g}'
              f'{" x K/16" if args.lr_k_scale else ""}, device {device}'
              f'{", bf16 autocast" if run["bf16"] else ", fp32"}', flush=True)

    # ===== resume =====
    start_epoch, step = 0, 0
    ckpt_path = Path(args.resume) if args.resume else output_dir / 'checkpoint.pt'
    if args.resume and not ckpt_path.is_file():
        raise data.DataError(f'--resume {ckpt_path}: no such file')
    if ckpt_path.is_file():
        start_epoch, step = load_checkpoint(ckpt_path, model, optimizer, args)
        if rank == 0:
            print(f'resumed from {ckpt_path} after epoch {start_epoch}', flush=True)

    ddp_model = model
    if ddp:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    # ===== training =====
    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    run['last_epoch'] = last_epoch
    if start_epoch >= args.epochs and rank == 0:
        print(f'{output_dir} already holds a finished run ({args.epochs} epochs); use another '
              '--output-dir to train again', flush=True)
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        step, stats = train_one_epoch(model, ddp_model, loader, optimizer, epoch, step, args, run)
        if ddp:
            stats['rank_param_max_diff'] = params_in_sync(model, world)
        if rank == 0:
            ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1,
                        step=step, args=vars(args))
            save_atomic(ckpt, output_dir / 'checkpoint.pt')
            if (epoch + 1) % args.save_every == 0:
                save_atomic(ckpt, output_dir / f'checkpoint-epoch{epoch + 1:04d}.pt')
            with open(output_dir / 'log.txt', 'a') as f:
                f.write(json.dumps(stats) + '\n')
            print(json.dumps(stats), flush=True)
        if (epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs:
            k = k_schedule(epoch + 1, args.epochs, args.k_schedule, args.k_max, args.k_min)
            path = output_dir / f'masks-epoch{epoch + 1:04d}.png' if rank == 0 else None
            visualize(model, vis, k, args, device, path,
                      f'epoch {epoch + 1}/{args.epochs}  K={k if k is not None else "superpixels"}')

    if rank == 0 and last_epoch == args.epochs:
        export_backbone(model, output_dir / 'backbone.pt')
        print(f'done: {output_dir}/backbone.pt (torchvision {args.arch} state_dict), '
              f'checkpoint.pt, log.txt, masks-epoch*.png', flush=True)
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    try:
        main(args)
    except data.DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f'\ninterrupted: {args.output_dir}/checkpoint.pt holds the last finished epoch; '
              'the same command continues from it', file=sys.stderr)
        sys.exit(130)
