"""R2O: Region-to-Object representation learning (Gokul et al., arXiv 2208.11821).

BYOL with mask pooling, where the masks are re-derived every step by clustering superpixels
with the target encoder's own features, and the number of clusters K shrinks over training.

This file reads top to bottom as the paper: first the method, as plain functions of tensors
(the backbone's feature maps, superpixel pooling, k-means, the refinement, masks per view, mask
pooling, the overlap indicator, the loss, the K curriculum, the schedules, LARS, a ViT's AdamW
groups and weight decay schedule, the EMA); then, in its own section, what exists only for
speed; then the training script.

Try it (CPU, no data, 3-4 minutes on 2 cores; writes runs/synthetic-cosine/):
    python r2o.py
One GPU:
    python r2o.py --data /path/to/imagenet
One node, 8 GPUs (the paper's 32 images per GPU; global batch 256, lr 0.3):
    torchrun --nproc_per_node=8 r2o.py --data /path/to/imagenet
The paper's global batch of 4096 on 8 large GPUs, k-means still over each 32 images:
    torchrun --nproc_per_node=8 r2o.py --data /path/to/imagenet --batch-size 512 --cluster-batch 32
Several nodes (run on each, with its --node_rank):
    torchrun --nnodes=4 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
        r2o.py --data /path/to/imagenet
Baselines: `--k-schedule constant --k-max 1 --no-lr-k-scale` is BYOL; `--k-schedule none` uses
the superpixels themselves as masks (DetCon-style).
A Vision Transformer (torchvision's VisionTransformer; masks on its 16-pixel patch grid, AdamW
with DINO's weight decay schedule and gradient clipping by default):
    python r2o.py --arch vit_s_16 --data /path/to/imagenet
"""
import argparse
import copy
import datetime
import errno
import functools
import io
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
from skimage.segmentation import find_boundaries, slic
from torchvision.ops import roi_align

import data


# ================================ the method ================================
#
# Each function and class of this section can be copied out with the imports above and the
# other names its docstring lists after "Uses:" (none listed: the imports alone).

# ---- the backbone ----

# R2O reads two feature maps of its encoder: the refinement clusters the target encoder's
# `cluster` map, the loss pools the `pool` map under the masks. One description per backbone
# family (feature_maps), one reader (encoder_features): another backbone is a change here only.
# ResNet: layer3 (14 x 14 at 224 px) and layer4 (7 x 7). (The reference's clustering pass runs
# the target through layer4 too, which only moves that layer's BatchNorm statistics; ours stops
# at CLUSTER_LAYER.)
CLUSTER_LAYER = 'layer3'                 # 14 x 14 at 224 px
POOL_LAYER = 'layer4'                    # 7 x 7 at 224 px
STRIDE = {'layer3': 16, 'layer4': 32}
# ViT (torchvision's VisionTransformer, patch 16): the patch tokens as a 14 x 14 map at 224 px,
# the class token kept in the network but not in the map. 'blockN' is block N's output (counted
# from 1), 'norm' the last block's after the final LayerNorm: the loss pools 'norm', the
# refinement clusters the block VIT_CLUSTER_FROM_END blocks before the last (block 9 of 12),
# as a ResNet clusters the stage before the pooled one: a block short of the end, whose tokens
# keep more of where they are than the ones the objective shapes most (README, ViT section).
VIT_POOL_LAYER = 'norm'
VIT_CLUSTER_FROM_END = 3
VIT_ARCHS = dict(vit_s_16=dict(patch_size=16, num_layers=12, num_heads=6, hidden_dim=384,
                               mlp_dim=1536),            # DINO's ViT-S/16
                 vit_b_16=dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                               mlp_dim=3072))            # torchvision's ViT-B/16


def build_encoder(arch='resnet50', image_size=224):
    """A torchvision ResNet with fc replaced by identity, or a torchvision VisionTransformer
    (vit_s_16, vit_b_16) for image_size x image_size inputs with its head replaced by identity:
    either's state_dict is a torchvision one.
    Uses: VIT_ARCHS.
    """
    if arch in VIT_ARCHS:
        net = torchvision.models.VisionTransformer(image_size, **VIT_ARCHS[arch])
        net.heads = nn.Identity()
        return net
    if arch not in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'):
        raise ValueError(f'unknown --arch {arch}')
    net = getattr(torchvision.models, arch)()
    net.fc = nn.Identity()
    return net


def feature_maps(net):
    """Which feature maps R2O reads from `net`, by its family: dict(cluster=the map the
    refinement clusters, pool=the map the loss pools, stride={map name: input pixels per cell}).
    Uses: CLUSTER_LAYER, POOL_LAYER, STRIDE, VIT_POOL_LAYER, VIT_CLUSTER_FROM_END.
    """
    if isinstance(net, torchvision.models.VisionTransformer):
        depth = len(net.encoder.layers)
        names = [f'block{i}' for i in range(1, depth + 1)] + [VIT_POOL_LAYER]
        return dict(cluster=f'block{max(1, depth - VIT_CLUSTER_FROM_END)}', pool=VIT_POOL_LAYER,
                    stride=dict.fromkeys(names, net.patch_size))
    return dict(cluster=CLUSTER_LAYER, pool=POOL_LAYER, stride=STRIDE)


def vit_tokens(net, x, layer='norm'):
    """A torchvision VisionTransformer's patch tokens at `layer` ('blockN': block N's output,
    counted from 1; 'norm': the last block's after the final LayerNorm) as a feature map.

    x: B x 3 x H x W (H, W multiples of the patch size) -> B x C x H/16 x W/16. The position
    embedding is interpolated (bicubic, class token's kept) when the grid differs from the one
    it was made for, so any input size reads the network.
    """
    depth = len(net.encoder.layers)
    blocks = {f'block{i}': i for i in range(1, depth + 1)} | {'norm': depth}
    if layer not in blocks:
        raise ValueError(f"layer must be 'norm' or 'block1'..'block{depth}', not {layer!r}")
    x = net.conv_proj(x)                                              # B C h w
    B, C, h, w = x.shape
    x = torch.cat([net.class_token.expand(B, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    pos = net.encoder.pos_embedding
    if pos.shape[1] != x.shape[1]:
        side = int(math.isqrt(pos.shape[1] - 1))
        grid = pos[:, 1:].reshape(1, side, side, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode='bicubic', align_corners=False)
        pos = torch.cat([pos[:, :1], grid.to(pos.dtype).flatten(2).transpose(1, 2)], 1)
    x = net.encoder.dropout(x + pos)
    for block in net.encoder.layers[:blocks[layer]]:
        x = block(x)
    if layer == 'norm':
        x = net.encoder.ln(x)
    return x[:, 1:].transpose(1, 2).reshape(B, C, h, w)


def encoder_features(net, x, layer='layer4'):
    """The feature map `layer` of an encoder build_encoder makes: a torchvision ResNet's 'layer3'
    or 'layer4', or a VisionTransformer's patch tokens (vit_tokens: 'blockN' or 'norm').

    x: B x 3 x H x W -> B x C x H/16 x W/16 (layer3, a ViT's) or B x C x H/32 x W/32 (layer4).
    Uses: vit_tokens.
    """
    if isinstance(net, torchvision.models.VisionTransformer):
        return vit_tokens(net, x, layer)
    if layer not in ('layer3', 'layer4'):
        raise ValueError(f"layer must be 'layer3' or 'layer4', not {layer!r}")
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer3(net.layer2(net.layer1(x)))
    return x if layer == 'layer3' else net.layer4(x)


def feature_dim(net, layer='layer4'):
    """Channels of `layer` (2048 for a ResNet-50's layer4; a ViT's width for any of its maps)."""
    if isinstance(net, torchvision.models.VisionTransformer):
        return net.hidden_dim
    block = getattr(net, layer)[-1]
    return (block.bn3 if hasattr(block, 'bn3') else block.bn2).num_features


def mlp(in_dim, hidden_dim=4096, out_dim=256):
    """BYOL's projector / predictor: Linear, BatchNorm1d, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


# ---- the superpixel prior ----

def downsample_labels(labels, size):
    """An integer label map (H x W numpy) brought to size x size: each cell takes the label
    covering most of it. Labels are then renumbered 0..n-1 (labels covering no cell disappear).
    Returns int64."""
    h, w = labels.shape
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(h, w)
    n = int(labels.max()) + 1
    cell = (np.arange(h) * size // h)[:, None] * size + (np.arange(w) * size // w)[None, :]
    counts = np.bincount((cell * n + labels).ravel(), minlength=size * size * n)
    out = counts.reshape(size * size, n).argmax(1)
    _, out = np.unique(out, return_inverse=True)
    return out.reshape(size, size).astype(np.int64)


def superpixel_map(image, n_segments=100, out_size=56, compactness=10.0, sigma=0.0):
    """R2O's prior: the SLIC superpixels of a whole image at the masks' resolution.

    image: H x W x 3 RGB (the image resized to the training size); returns out_size x out_size
    int64 ids 0..n-1 (56 x 56 at 224 px), each cell the superpixel that covers most of it
    (downsample_labels; the reference resizes one-hot maps bilinearly, mixing ids at borders).
    n_segments=100, compactness 10 and sigma 0 are the reference's (and scikit-image's). On
    strongly textured images they fragment and the connectivity step merges the pieces into a
    few huge segments; a higher compactness and sigma=1 keep them regular.
    Computed once per image: the loader caches it (data.SuperpixelCache).
    Uses: downsample_labels.
    """
    labels = slic(image, n_segments=n_segments, compactness=compactness, sigma=sigma,
                  start_label=0, channel_axis=-1)
    return downsample_labels(labels, out_size)


# ---- refinement: superpixels -> object masks ----

def superpixel_pool(features, superpixels, n_superpixels=None):
    """Average features inside each superpixel.

    features: B x C x h x w; superpixels: B x M x M integer ids of any integer dtype (M a
    multiple of h, e.g. 56 vs 14; another M is refused).
    Each superpixel's weight on a feature cell is the fraction of that cell it covers.
    Returns pooled B x S x C and area B x S (0 for ids absent from an image), S = max id + 1
    (or n_superpixels: give it when it is known on the host, as reading the max waits for a GPU).
    """
    M, h = superpixels.shape[-1], features.shape[-1]
    if M % h or superpixels.shape[-2] % features.shape[-2]:
        raise ValueError(f'superpixels of side {tuple(superpixels.shape[-2:])} must be a multiple '
                         f'of the feature map\'s {tuple(features.shape[-2:])}')
    S = n_superpixels or int(superpixels.max()) + 1
    onehot = F.one_hot(superpixels.long(), S).permute(0, 3, 1, 2).to(features.dtype)   # B S M M
    weights = F.adaptive_avg_pool2d(onehot, features.shape[-2:]).flatten(2)    # B S hw
    area = weights.sum(-1)
    pooled = weights @ features.flatten(2).transpose(1, 2)                     # B S C
    return pooled / area.clamp_min(1e-6)[..., None], area


def squared_distances(x, c, x_sq=None):
    """|x_i - c_j|^2 for the rows of x (N x D) and c (M x D): N x M, through one matrix product.
    x_sq: the rows' squared norms, N x 1, when the caller has them already."""
    x_sq = (x * x).sum(1, keepdim=True) if x_sq is None else x_sq
    return torch.addmm(x_sq, x, c.T, alpha=-2).add_((c * c).sum(1)).clamp_min_(0)


def kmeans_seeds(x, k, generator=None, weight=None):
    """k initial centres among the rows of x (N x D, k <= N): greedy k-means++ (the reference's,
    and scikit-learn's).

    The first centre is a row drawn uniformly. Each next one is drawn in proportion to D^2, the
    squared distance of a row to its nearest centre so far; greedy: 2 + ln k candidates are drawn
    and the one that leaves the smallest total D^2 is kept.
    weight: N 0/1 floats; rows of weight 0 are never drawn and do not count in the total (with
    fewer than k rows of weight 1, each of them is a centre and the rest repeat them).
    The random numbers come from the generator's device (the CPU for torch.Generator()), so a
    CPU generator draws the same numbers on every device.
    Uses: squared_distances.
    """
    n = x.shape[0]
    w = torch.ones(n, device=x.device) if weight is None else weight.float()
    trials = 2 + int(math.log(k))
    uniform = torch.rand(k, trials, generator=generator,
                         device=generator.device if generator is not None else x.device
                         ).to(x.device, non_blocking=True)

    def draw(p, u):                        # rows drawn in proportion to p, one per number in u
        cdf = p.double().cumsum(0)
        return torch.searchsorted(cdf, u.double() * cdf[-1], right=True).clamp_max(n - 1)

    centres = draw(w, uniform[0, :1])
    closest = squared_distances(x, x[centres])[:, 0]
    for i in range(1, k):
        # + 1e-12: rows equal to a centre keep a tiny chance, so a draw always exists
        candidates = draw((closest + 1e-12) * w, uniform[i])
        new_closest = torch.minimum(closest[:, None], squared_distances(x, x[candidates]))
        best = (new_closest * w[:, None]).sum(0).argmin()[None]   # kept on the device: no wait
        closest = new_closest.index_select(1, best)[:, 0]
        centres = torch.cat([centres, candidates[best]])
    return x[centres]


def kmeans(x, k, iters=30, generator=None, weight=None, deterministic=False, seeding=kmeans_seeds):
    """K-means of the rows of x (N x D), in fp32 on x's device.

    `seeding` picks k centres (kmeans_seeds: greedy k-means++; any function with its signature
    (x, k, generator, weight) -> k x D), then `iters` Lloyd steps follow: a fixed number, so
    nothing waits for a convergence test on the GPU. The reference iterates until the inertia
    changes by less than 1e-6, at most 200 steps (what that costs and gains over 30 steps:
    bench.py, part 3). A cluster left empty restarts at a far row: the r-th empty cluster (in
    index order) takes the r-th farthest row from its centroid, as scikit-learn does, so no
    centroid is ever NaN or wasted: with distinct rows each restart holds a row again at the
    next step (of clusters restarted on copies of one row, one does). k is capped at N.
    weight: optional N 0/1 floats; rows of weight 0 (absent superpixels) are never seeds and
    pull no centroid, yet get a label, so a caller keeps fixed shapes instead of selecting rows.
    deterministic: sum each cluster's rows with a one-hot matrix product (the same bits every
    run, k times the arithmetic) instead of index_add_, whose atomic float additions on a GPU
    land in a varying order (on a CPU index_add_ is deterministic already).
    Returns labels (N,) int64 in [0, k) and centroids (k x D).
    Uses: kmeans_seeds, squared_distances.
    """
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)   # a diverged net: no crash
    n, k = x.shape[0], min(k, x.shape[0])
    w = torch.ones(n, device=x.device) if weight is None else weight.float()
    centroids = seeding(x, k, generator, w)
    rows = torch.cat([x * w[:, None], w[:, None]], 1)                  # the rows and their count
    x_sq = (x * x).sum(1, keepdim=True)
    for _ in range(iters):
        distance, labels = squared_distances(x, centroids, x_sq).min(1)
        if deterministic:
            sums = F.one_hot(labels, k).T.float() @ rows
        else:
            sums = torch.zeros(k, rows.shape[1], device=x.device).index_add_(0, labels, rows)
        count = sums[:, -1:]
        empty = count[:, 0] == 0
        farthest = x[(distance * w).topk(k).indices[(empty.cumsum(0) - 1).clamp_min(0)]]
        centroids = torch.where(empty[:, None], farthest, sums[:, :-1] / count.clamp_min(1))
    return squared_distances(x, centroids, x_sq).argmin(1), centroids


@torch.no_grad()
def refine(features, superpixels, k, iters=30, generator=None, group=None, n_superpixels=None,
           cluster=kmeans, normalize=True):
    """R2O's refinement: cluster the superpixels of a batch into k masks by the encoder's features.

    features: B x C x h x w (the target encoder's cluster map on the raw view, feature_maps);
    superpixels: B x M x M ids (M a multiple of h). Each superpixel's features are averaged
    (superpixel_pool) and L2-normalised (`normalize`), then the superpixels of each `group`
    images (default: all B together) are clustered, so that a cluster id means the same thing
    in every image of a group. Ids absent from an image take no part (weight 0; the reference
    clusters them as zero rows). Each cell of the M x M map then takes its superpixel's cluster.
    cluster: the clustering, any function with kmeans's signature (x, k, iters, generator,
    weight) -> (labels, ...); groups are clustered one after the other with the one generator.
    n_superpixels: see superpixel_pool. Returns B x M x M int64 cluster ids in [0, k).
    Uses: superpixel_pool, kmeans, kmeans_seeds, squared_distances.
    """
    B = features.shape[0]
    group = group or B
    if B % group:
        raise ValueError(f'a batch of {B} images does not split into groups of {group}')
    with torch.autocast(features.device.type, enabled=False):        # k-means in fp32
        pooled, area = superpixel_pool(features.float(), superpixels, n_superpixels)   # B x S x C
        pooled = F.normalize(pooled, dim=-1) if normalize else pooled
        S = pooled.shape[1]
        x = pooled.reshape(B // group, group * S, -1)
        present = (area > 0).float().view(B // group, group * S)
        labels = torch.stack([cluster(xg, k, iters, generator, wg)[0] for xg, wg in zip(x, present)])
    return labels.view(B, S).gather(1, superpixels.flatten(1).long()).view_as(superpixels)


def view_masks(labels, boxes, flips, k, out_size):
    """Soft masks of one view: the label map cut to the view's crop box and flipped like it.

    labels: B x M x M ints in [0, k) (any integer dtype); boxes: B x 4 (x0, y0, x1, y1)
    normalised to the whole image; flips: B bools. Returns B x k x out_size^2; at every cell the k values sum to 1.
    roi_align with an adaptive sampling ratio (the reference's) and aligned=True: each cell holds
    about the fraction of it each cluster covers (over crop boxes drawn as the loader draws
    them, the worst cell of a box is off by 0.007 in the median, 0.04 at most: bench.py, part
    5); the reference's aligned=False shifts the label map by half a label cell (the worst cell
    is then off by 0.14 in the median).
    """
    B, M, _ = labels.shape
    onehot = F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float()           # B k M M
    rois = torch.cat([torch.arange(B, device=labels.device, dtype=torch.float32)[:, None],
                      boxes.float() * M], 1)
    masks = roi_align(onehot, rois, out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    masks = torch.where(flips[:, None, None, None], masks.flip(-1), masks)
    return masks.flatten(2)


@torch.no_grad()
def masks_for_batch(target_encoder, raw, superpixels, boxes, flips, k, iters=30, generator=None,
                    group=None, n_superpixels=None, cluster=kmeans):
    """Both views' soft masks for a batch, and their number K.

    raw: B x 3 x H x H, the whole images; superpixels: B x M x M ids; boxes: B x 2 x 4 and
    flips: B x 2, each view's crop box and flip. k a number: the refinement (the target
    encoder's cluster map, feature_maps, on the raw view, then refine over each `group` images
    with `cluster`); k == 1: one mask, the whole crop (BYOL); k None: the superpixels themselves
    (DetCon-style), K = n_superpixels. Returns masks1, masks2 (B x K x g^2, g = H / stride of
    the pooled map: H / 32 for a ResNet, H / 16 for a ViT) and K.
    Uses: encoder_features, vit_tokens, feature_maps, refine, view_masks, superpixel_pool,
    kmeans, kmeans_seeds, squared_distances, CLUSTER_LAYER, POOL_LAYER, STRIDE, VIT_POOL_LAYER,
    VIT_CLUSTER_FROM_END.
    """
    maps = feature_maps(target_encoder)
    if k is None:
        labels, k = superpixels, n_superpixels or int(superpixels.max()) + 1
    elif k == 1:
        labels = torch.zeros_like(superpixels)
    else:
        features = encoder_features(target_encoder, raw, maps['cluster'])
        labels = refine(features, superpixels, k, iters, generator, group, n_superpixels, cluster)
    g = raw.shape[-1] // maps['stride'][maps['pool']]
    return (view_masks(labels, boxes[:, 0], flips[:, 0], k, g),
            view_masks(labels, boxes[:, 1], flips[:, 1], k, g), k)


# ---- the mask-level loss ----

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


def mask_loss(p1, p2, z1, z2, valid, groups=1):
    """R2O's objective: BYOL's regression of each mask across the two views.

    p1, p2: the online predictions of view 1's and view 2's masks, B x K x D; z1, z2: the target
    projections of the same masks; valid: B x K, the overlap indicator (mask_overlap).
    L12 is 2 - 2 cos(p1, z2), the prediction of a mask in view 1 against the target's
    projection of the same mask in view 2, averaged over the valid (image, mask) pairs; L21 the
    same with the views swapped. Returns the reference's (L12 + L21) / 2.
    groups: the batch holds this many cluster groups (--cluster-batch); each term is then the
    mean of each group's own average, which is what DDP's averaging over GPUs makes of
    per-GPU losses when every GPU holds one group.
    """
    if valid.shape[0] % groups:
        raise ValueError(f'a batch of {valid.shape[0]} images does not split into groups={groups}')
    valid = valid.float().view(groups, -1)

    def regression(p, z):                  # averaged over each group's valid pairs
        cos = (F.normalize(p.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1)
        per_pair = (2 - 2 * cos).view(groups, -1) * valid
        return (per_pair.sum(1) / valid.sum(1).clamp_min(1)).mean()

    return (regression(p1, z2) + regression(p2, z1)) / 2


def heads(rows, mlps):
    """Pooled rows B' x K x C through each mlp in turn (projector, predictor), all B' x K rows
    as one batch: the reference's, so BatchNorm's statistics include the empty masks' zero rows
    (the loss ignores those rows afterwards). Returns B' x K x D."""
    out = rows.flatten(0, 1)
    for m in mlps:
        out = m(out)
    return out.view(*rows.shape[:2], -1)


class R2O(nn.Module):
    """BYOL's networks, used mask by mask: the online encoder, projector and predictor, and the
    target (an EMA copy) encoder and projector. forward(view1, view2, masks1, masks2) returns
    R2O's loss for a batch.

    encoder: a backbone encoder_features reads (build_encoder's ResNet or ViT); the loss pools
    its family's pool map (feature_maps). heads: how the pooled rows go through the MLPs (heads,
    the reference's; the training script may give heads_merging_empty_rows, the same numbers
    computed faster where most masks are empty).
    Uses: encoder_features, vit_tokens, feature_maps, feature_dim, mlp, mask_pool, mask_overlap,
    mask_loss, heads, CLUSTER_LAYER, POOL_LAYER, STRIDE, VIT_POOL_LAYER, VIT_CLUSTER_FROM_END.
    """

    def __init__(self, encoder, hidden_dim=4096, out_dim=256, heads=heads):
        super().__init__()
        self.encoder = encoder
        self.pool_layer = feature_maps(encoder)['pool']
        self.projector = mlp(feature_dim(encoder, self.pool_layer), hidden_dim, out_dim)
        self.predictor = mlp(out_dim, hidden_dim, out_dim)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.heads = heads

    def forward(self, view1, view2, masks1, masks2, groups=1):
        """Views B x 3 x S x S and their masks B x K x g^2 -> the loss (groups: see mask_loss)."""
        views, masks = torch.cat([view1, view2]), torch.cat([masks1, masks2])   # one batch
        online = mask_pool(encoder_features(self.encoder, views, self.pool_layer), masks)  # 2B K C
        p1, p2 = self.heads(online, [self.projector, self.predictor]).chunk(2)
        with torch.no_grad():
            target = mask_pool(encoder_features(self.target_encoder, views, self.pool_layer),
                               masks)
            z1, z2 = self.heads(target, [self.target_projector]).chunk(2)
        return mask_loss(p1, p2, z1, z2, mask_overlap(masks1, masks2), groups)


# ---- the curriculum and the schedules ----

def k_schedule(epoch, epochs, kind='cosine', k_max=128, k_min=4):
    """Number of clusters K for `epoch` (counted from 1 to `epochs`), or None for 'none'
    (the superpixels themselves are the masks).

    cosine (R2O's default): int(k_min + (k_max - k_min) * cos(pi/2 * epoch/epochs)): 127 at
    epoch 1 of 300, 4 at the last;
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


def learning_rate(step, total_steps, warmup_steps, base_lr=0.3, global_batch=256, k=None):
    """The learning rate at `step`: base_lr per 256 images, scaled linearly to the global batch
    (all GPUs together), times K/16 when the epoch's K is given; a linear warmup from 0 over
    warmup_steps, then a cosine to 0 at total_steps.

    The K/16 factor is the reference's (it scales its scheduled lr by the epoch's K / 16;
    --no-lr-k-scale drops the factor). With the cosine curriculum it swings the peak 32x
    over training: at batch 256 and base_lr 0.3, 2.4 at K=128, 0.3 at K=16, 0.075 at K=4."""
    peak = base_lr * global_batch / 256 * (k / 16 if k is not None else 1)
    if step < warmup_steps:
        return peak * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def ema_momentum(step, total_steps, base=0.99, batch_ratio=1.0):
    """The target's EMA momentum at `step`: base ** batch_ratio at step 0, then up to 1 at the
    end on a cosine.

    base is the momentum per step at the paper's global batch of 4096; batch_ratio = this run's
    global batch / 4096 keeps the target's horizon in images (the EMA scaling rule: 0.99 per
    4096 images is 0.99^(1/16) = 0.99937 per step of 256)."""
    start = base ** batch_ratio
    return 1 - (1 - start) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(model, momentum):
    """target = momentum * target + (1 - momentum) * online, over the parameters of an R2O
    model's encoder and projector (the reference's: the target's BatchNorm running statistics
    stay those of its own forward passes)."""
    for online_net, target_net in ((model.encoder, model.target_encoder),
                                   (model.projector, model.target_projector)):
        for online, target in zip(online_net.parameters(), target_net.parameters()):
            target.lerp_(online, 1 - momentum)        # target + (1 - momentum) (online - target)


# ---- the optimizer ----

class LARS(torch.optim.Optimizer):
    """LARS (You et al.) with SGD momentum, as the reference computes it: the learning rate and
    the trust ratio go into the momentum buffer,

        buf = momentum * buf + lr * trust * (grad + weight_decay * w),   w -= buf,
        trust = trust_coefficient * |w| / (|grad| + weight_decay * |w|),

    per tensor, so a change of lr (warmup, the K/16 scaling) acts on new gradients only. A zero
    weight takes trust 1, as in the reference (a zero gradient gives trust_coefficient /
    weight_decay, as its formula does). Groups with lars_exclude=True (biases and BatchNorm)
    take buf = momentum * buf + lr * grad: no trust ratio, no weight decay."""

    def __init__(self, params, lr=0.0, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for w in g['params']:
                if w.grad is None:
                    continue
                if g['lars_exclude']:
                    update = w.grad * g['lr']
                else:
                    wd = g['weight_decay']
                    w_norm, g_norm = w.norm(), w.grad.norm()
                    denominator = g_norm + wd * w_norm
                    # 0/0 only with a zero gradient and no weight decay: the update is 0 anyway
                    trust = torch.where((w_norm > 0) & (denominator > 0),
                                        g['trust_coefficient'] * w_norm / denominator,
                                        torch.ones_like(w_norm))
                    update = (w.grad + wd * w) * (trust * g['lr'])
                state = self.state[w]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(w)
                buf = state['momentum_buffer']
                buf.mul_(g['momentum']).add_(update)
                w.sub_(buf)


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


def weight_decay_schedule(step, total_steps, start=0.04, end=0.4):
    """AdamW's weight decay at `step` for a ViT, DINO's: from start at step 0 up to end at
    total_steps on a cosine (0.04 -> 0.4)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def adamw_param_groups(module):
    """Two groups, as DINO makes them for AdamW: weights (decay=True: weight decay, scheduled
    by weight_decay_schedule) and biases + every one-dimensional parameter, the LayerNorm and
    BatchNorm ones (decay=False: none). Only parameters that require grad are included."""
    regular, excluded = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (excluded if name.endswith('bias') or p.dim() == 1 else regular).append(p)
    return [dict(params=regular, decay=True), dict(params=excluded, weight_decay=0.0, decay=False)]


# ================================ speed and bookkeeping ================================
#
# What exists only to make the method fast, or to feed it: each function here computes what a
# part of the method computes (a test holds it equal to the plain version), and the training
# script chooses it. One exception, a flag and not a default: kmeans_seeds_in_rounds, a faster
# seeding whose inertia a test holds within a stated margin of the method's.

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


def heads_merging_empty_rows(rows, mlps):
    """heads(rows, mlps), computed on the distinct rows. Every empty mask pools to the same zero
    row, so that row goes through the MLPs once and counts as often as it occurs
    (mlp_with_counts): the outputs, gradients and BatchNorm statistics of heads, at the cost of
    the non-empty rows. At K=128 an image has about 5 of its 128 masks in a view, and a CPU step
    takes 1.4x BYOL's instead of 5.6x (bench.py). Counting the rows reads a number from the
    device, a wait on a GPU, where every row through the heads costs little: the training
    script uses this on a CPU."""
    flat = rows.flatten(0, 1)
    keep = (flat != 0).any(1)                              # the rows that are not the zero row
    n_keep = int(keep.sum())
    distinct = torch.cat([flat[keep], flat.new_zeros(1, flat.shape[1])])
    counts = torch.cat([torch.ones(n_keep, device=flat.device), (~keep).sum()[None].float()])
    for m in mlps:
        distinct = mlp_with_counts(m, distinct, counts)
    back = torch.where(keep, keep.cumsum(0) - 1, n_keep)   # row r of rows is distinct[back[r]]
    return distinct[back].view(*rows.shape[:2], -1)


def seeding_rounds(k):
    """How many centres each round of kmeans_seeds_in_rounds adds: half as many as there are already,
    after the first one (1, 1, 1, 2, 3, 4, 6, ... : 12 rounds for k=128)."""
    sizes, have = [], 1
    while have < k:
        sizes.append(min(max(1, have // 2), k - have))
        have += sizes[-1]
    return sizes


def kmeans_seeds_in_rounds(x, k, generator=None, weight=None):
    """kmeans_seeds's job in 12 rounds instead of 128 sequential steps (at k=128), approximately:
    D^2 seeding in rounds (--kmeans-seeding rounds).

    k-means++ draws k centres one by one, each row with probability proportional to D^2, its
    squared distance to the nearest centre so far. Here each round draws, without replacement,
    half as many new centres as there already are from that same distribution (seeding_rounds):
    a few dozen kernel launches instead of thousands, and no greedy choice among candidates.
    Not the same numbers: after the Lloyd steps its inertia is within 2% of greedy k-means++'s
    on unstructured rows (a test), 6% higher on the demo step's features at K=128 and 24% higher
    on well-separated planted clusters, where the greedy choice avoids two seeds in one cluster
    (bench.py, part 3). The m rows with the largest p / E, E ~ Exp(1), are m draws without
    replacement in proportion to p (an exponential race).
    weight: N 0/1 floats; rows of weight 0 are never drawn unless fewer than k others exist.
    The random numbers are drawn on the generator's device (the CPU for torch.Generator()) and
    moved to x's, so a CPU generator gives the same centres on every device.
    Uses: seeding_rounds, squared_distances.
    """
    n = x.shape[0]
    w = torch.ones(n, device=x.device) if weight is None else weight.float()
    sizes = seeding_rounds(k)
    uniform = torch.rand(len(sizes) + 1, n, generator=generator,
                         device=generator.device if generator is not None else x.device)
    race = w / -uniform.to(x.device, non_blocking=True).log()      # w / E: weight 0 never wins
    x_sq = (x * x).sum(1, keepdim=True)
    picks = race[0].argmax()[None]                                 # the first: uniformly
    closest = squared_distances(x, x[picks], x_sq)[:, 0]
    for r, m in enumerate(sizes, 1):
        # + 1e-12: rows equal to a centre keep a tiny chance, so m draws always exist
        new = ((closest + 1e-12) * race[r]).topk(m).indices
        closest = torch.minimum(closest, squared_distances(x, x[new], x_sq).amin(1))
        picks = torch.cat([picks, new])
    return x[picks]


class LARSForeach(LARS):
    """LARS, the same update with all tensors of a group at once (torch._foreach_*): a few
    kernel launches per group instead of a few per tensor, which a GPU spends most of a small
    step's optimizer time on. The training script's optimizer; a test holds it equal to LARS."""

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            params = [p for p in g['params'] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                if 'momentum_buffer' not in self.state[p]:
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p)
                bufs.append(self.state[p]['momentum_buffer'])
            if g['lars_exclude']:
                updates = torch._foreach_mul(grads, g['lr'])
            else:
                wd = g['weight_decay']
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                denominator = g_norm + wd * w_norm
                trust = torch.where((w_norm > 0) & (denominator > 0),
                                    g['trust_coefficient'] * w_norm / denominator,
                                    torch.ones_like(w_norm))
                updates = torch._foreach_add(grads, params, alpha=wd)
                torch._foreach_mul_(updates, list((trust * g['lr']).unbind()))
            torch._foreach_mul_(bufs, g['momentum'])
            torch._foreach_add_(bufs, updates)
            torch._foreach_sub_(params, bufs)


@torch.no_grad()
def ema_update_foreach(model, momentum):
    """ema_update with one kernel launch for all parameters (torch._foreach_lerp_): the training
    script's; a test holds it equal to ema_update."""
    online = [p for net in (model.encoder, model.projector) for p in net.parameters()]
    target = [p for net in (model.target_encoder, model.target_projector) for p in net.parameters()]
    torch._foreach_lerp_(target, online, 1 - momentum)


BATCH_TENSORS = ('view1', 'view2', 'raw', 'superpixels', 'boxes', 'flips')


def batch_to_device(batch, device, channels_last=False):
    """A loader batch's tensors on `device`, copied without waiting (from pinned memory on CUDA),
    the views' colour augmentation done there (data.finish_on_device: uint8 crosses the bus).
    The batch's number of superpixel ids, `n_superpixels`, was counted by the loader (data.collate)."""
    for name in BATCH_TENSORS + (('photometric',) if 'photometric' in batch else ()):
        batch[name] = batch[name].to(device, non_blocking=True)
    batch = data.finish_on_device(batch)
    for name in BATCH_TENSORS:
        if channels_last and batch[name].dim() == 4:
            batch[name] = batch[name].contiguous(memory_format=torch.channels_last)
    return batch


def batches_on_device(loader, device, channels_last=False):
    """The loader's batches on `device`, each one copied while the step before it runs.

    On CUDA the copies run on a stream of their own: the next batch's copy is queued before a
    batch is handed out, the step's stream waits for that batch's copy alone (an event per
    batch), and its tensors are recorded on the step's stream so that their memory is not
    reused while the step still reads them. On a CPU the batches are simply copied ahead."""
    stream = torch.cuda.Stream(device) if device.type == 'cuda' else None

    def ready(batch):
        if stream is not None:
            step_stream = torch.cuda.current_stream(device)
            step_stream.wait_event(batch.pop('copied'))
            for name in BATCH_TENSORS:
                batch[name].record_stream(step_stream)
        return batch

    ahead = None
    for batch in loader:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            batch = batch_to_device(batch, device, channels_last)
            if stream is not None:
                batch['copied'] = stream.record_event()
        if ahead is not None:
            yield ready(ahead)
        ahead = batch
    if ahead is not None:
        yield ready(ahead)


# ================================ the training step and epoch ================================

def step_generator(seed, rank, step):
    """The generator of one step's k-means draws, seeded by (seed, rank, step) alone: a resumed
    run draws exactly what an uninterrupted one would, whatever the process drew before. It is a
    CPU generator on every device (kmeans_seeds moves its numbers), so a GPU draws what a CPU
    draws."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63)


def step_loss(model, ddp_model, batch, k, generator, run):
    """The loss of one batch already on the device: its masks (masks_for_batch, with the run's
    clustering and --cluster-batch groups), then R2O's loss, under the run's precision.

    Returns the loss and the number of (image, mask) pairs in it, both device tensors: reading
    them would make the host wait for the GPU."""
    B = batch['raw'].shape[0]
    group = run['cluster_batch'] or B
    with run['autocast']():
        masks1, masks2, _ = masks_for_batch(
            model.target_encoder, batch['raw'], batch['superpixels'], batch['boxes'],
            batch['flips'], k, iters=run['kmeans_iters'], generator=generator, group=group,
            n_superpixels=batch['n_superpixels'], cluster=run['cluster'])
        loss = ddp_model(batch['view1'], batch['view2'], masks1, masks2, B // group)
    return loss, mask_overlap(masks1, masks2).sum()


def step_update(model, optimizer, lr, momentum, weight_decay=None, clip_grad=None):
    """After the backward pass: the optimizer (LARS, or AdamW for a ViT) at this step's lr, then
    the target's EMA update (ema_update_foreach: ema_update in one launch).

    weight_decay: this step's decay for the groups marked decay=True (adamw_param_groups);
    clip_grad: the gradients' total norm is clipped to it first. None: neither (LARS)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
        if weight_decay is not None and group.get('decay'):
            group['weight_decay'] = weight_decay
    if clip_grad:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']],
                                 clip_grad)
    optimizer.step()
    ema_update_foreach(model, momentum)


def train_one_epoch(model, ddp_model, loader, optimizer, epoch, step, args, run):
    """One pass over the loader. `run` holds the run-wide constants (run_constants).
    Returns the step count and a dict of epoch statistics.

    Loss and mask counts add up on the device and are read only for a progress line, so the
    host never waits for the GPU within a step; a non-finite loss is caught there, before the
    epoch's checkpoint is written."""
    device = run['device']
    k = k_schedule(epoch + 1, args.epochs, args.k_schedule, args.k_max, args.k_min)
    model.train()
    n_steps = len(loader)
    sums = torch.zeros(2, dtype=torch.float64, device=device)     # loss, mask pairs
    seen, bad, checked = 0, [], 0
    start = time.time()
    for it, batch in enumerate(batches_on_device(loader, device, run['channels_last'])):
        lr = learning_rate(step, run['total_steps'], run['warmup_steps'], args.lr,
                           run['global_batch'], k if args.lr_k_scale else None)
        momentum = ema_momentum(step, run['total_steps'], args.ema, run['ema_batch_ratio'])
        decay = (weight_decay_schedule(step, run['total_steps'], args.weight_decay,
                                       args.weight_decay_end) if args.optimizer == 'adamw' else None)
        loss, pairs = step_loss(model, ddp_model, batch, k, step_generator(args.seed, run['rank'], step), run)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step_update(model, optimizer, lr, momentum, decay, args.clip_grad or None)
        step += 1
        sums += torch.stack([loss.detach().double(), pairs.double()])

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
                      f'loss {loss_sum / (it + 1):.4f} K {k if k is not None else "superpixels"} '
                      f'lr {lr:.4g} ema {momentum:.5f} masks/img {pairs_sum / seen:.1f} '
                      f'{seen * run["world"] / elapsed:.1f} img/s '
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


@torch.no_grad()
def visualize(model, vis, k, run, path, title):
    """Refine the fixed picture batch with the current target encoder and the run's clustering,
    and draw it (rank 0).

    Every rank runs it (SyncBatchNorm needs all of them) on a copy of the encoder, with its
    own generator, so training state and random streams are untouched."""
    raw, sp = vis['raw'].to(run['device']), vis['superpixels'].to(run['device'])
    if k is None:
        labels = sp
    else:
        encoder = copy.deepcopy(model.target_encoder)
        features = encoder_features(encoder, raw, feature_maps(encoder)['cluster'])
        labels = refine(features, sp, k, run['kmeans_iters'], torch.Generator().manual_seed(0),
                        cluster=run['cluster'])
    if path is not None:
        mask_picture([data.denormalize(x) for x in raw.cpu()], sp.cpu().numpy(),
                     labels.cpu().numpy(), path, title)


# ================================ arguments ================================

# Defaults that depend on the data: the paper's settings for a real dataset, a small preset for
# the built-in generated scenes (3-4 minutes on 2 CPU cores). A flag given explicitly wins.
PAPER = dict(arch='resnet50', image_size=224, epochs=300, batch_size=32, lr=0.3,
             superpixels=100, slic_compactness=10.0, slic_sigma=0.0, k_max=128, k_min=4,
             warmup_epochs=3, ema_batch_scale=True, save_every=25, vis_every=10,
             print_freq=50)
# The demo's EMA: 0.99 per step of 32 images, unscaled. Scaled to the paper's horizon (0.99 per
# 4096 images) it would be 0.99992 per step, and the target would hardly move in 160 steps.
DEMO = dict(arch='resnet18', image_size=64, epochs=8, batch_size=32, lr=2.4, superpixels=24,
            slic_compactness=30.0, slic_sigma=1.0, k_max=32, k_min=4, warmup_epochs=1,
            ema_batch_scale=False, workers=2, save_every=4, vis_every=1, print_freq=8,
            synthetic_images=640)
PAPER_GLOBAL_BATCH = 4096           # 128 GPUs x 32 images
# Each optimizer's defaults, on both presets (a flag given explicitly wins). The paper has no
# ViT setting: AdamW's are DINO's for ViT-S/16 (lr 5e-4 per 256 images, weight decay 0.04 ->
# 0.4 on a cosine, gradients clipped; DINO clips each tensor to norm 3.0, we clip the total).
OPTIMIZERS = dict(lars=dict(weight_decay=1e-6, clip_grad=0.0),
                  adamw=dict(lr=5e-4, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0))


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
                        'of images, searched recursively: COCO\'s train2017), or "synthetic" for '
                        'generated scenes')
    g.add_argument('--synthetic-images', type=int, default=None,
                   help='number of generated scenes per epoch with --data synthetic (preset 640)')
    g.add_argument('--image-size', type=int, default=None,
                   help='training resolution, a multiple of 32 (224; synthetic preset 64). Masks '
                        'live at image-size/4')
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
    g.add_argument('--superpixel-cache', default='runs/superpixel-cache',
                   help='folder for the per-dataset superpixel cache (computed once, reused every '
                        'epoch and by every run on the same data); "none" recomputes SLIC every time')
    g.add_argument('--prebuild-superpixels', action='store_true',
                   help='fill the superpixel cache for these settings with all of this node\'s '
                        'cores (--workers processes), then exit; run it before training so the '
                        'first epoch does not compute SLIC. It resumes where it stopped and may '
                        'run on several nodes at once over a shared cache folder')
    g.add_argument('--flip-p', type=float, default=0.5,
                   help='horizontal flip probability per view (the reference code flips always: 1.0)')
    g.add_argument('--blur', default='gaussian', choices=['gaussian', 'pillow'],
                   help='Gaussian blur of the views: the reference\'s (OpenCV\'s 23 x 23 Gaussian, '
                        'computed one axis at a time: as fast as Pillow\'s), or Pillow\'s '
                        'box-filter approximation of it')
    g.add_argument('--photometric-on', default='device', choices=['device', 'loader'],
                   help='where the views\' colour augmentation (jitter, grey, blur, solarize) and '
                        'normalisation run: batched on the training device (the loader ships '
                        'uint8 crops: a third of its CPU time), or per image in the loader with '
                        'Pillow, as the reference does (needed for --blur pillow)')
    g.add_argument('--resample', default='torch', choices=list(data.RESAMPLE),
                   help='how the loader resizes the crops and the raw view (bicubic, '
                        'antialiased): torch\'s uint8 kernel (within 2 grey levels of Pillow\'s, '
                        '3.5 times as fast), or Pillow\'s, as the reference does')
    g.add_argument('--workers', type=int, default=None,
                   help='loader processes per GPU (the node\'s cores / its GPUs, less one; preset 2)')
    g.add_argument('--max-bad-fraction', type=float, default=0.01,
                   help='stop if more than this fraction of the images read so far are unreadable')

    g = p.add_argument_group('model')
    g.add_argument('--arch', default=None,
                   help='resnet18/34/50/101/152, or a ViT: vit_s_16 (DINO\'s ViT-S/16), vit_b_16 '
                        '(resnet50; preset resnet18)')
    g.add_argument('--hidden-dim', type=int, default=4096, help='projector/predictor hidden size')
    g.add_argument('--out-dim', type=int, default=256, help='projection size')

    g = p.add_argument_group('masks and the K curriculum')
    g.add_argument('--k-schedule', default='cosine', choices=['cosine', 'linear', 'constant', 'none'],
                   help='how K shrinks over epochs; "constant" keeps --k-max (with --k-max 1 this is '
                        'BYOL); "none" uses the superpixels themselves as masks (DetCon-style)')
    g.add_argument('--k-max', type=int, default=None, help='K at the start (128; preset 32)')
    g.add_argument('--k-min', type=int, default=None, help='K at the end (4)')
    g.add_argument('--kmeans-iters', type=int, default=30,
                   help='Lloyd iterations per step, fixed (the reference runs to convergence, cap 200)')
    g.add_argument('--kmeans-seeding', default='greedy', choices=sorted(SEEDINGS),
                   help='k-means\'s seeding: the reference\'s greedy k-means++ (r2o.kmeans_seeds: '
                        'K sequential steps), or D^2 draws in rounds (r2o.kmeans_seeds_in_rounds: '
                        '12 rounds at K=128, a fifth of the tensor operations; its inertia is 6%% '
                        'higher on the demo\'s features at K=128 and 24%% on well-separated '
                        'clusters: bench.py, part 3)')
    g.add_argument('--cluster-batch', type=int, default=None,
                   help='k-means over each group of this many images on its own, and the loss the '
                        'mean of the groups\' losses (default: the whole per-GPU batch is one '
                        'group); the target encoder still sees the whole batch. The paper clusters '
                        '32 images per GPU: with a larger --batch-size, --cluster-batch 32 keeps that')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=None, help='epochs (300; preset 8)')
    g.add_argument('--batch-size', type=int, default=None,
                   help='images per GPU/process (32). The paper\'s global batch is 4096: on 8 GPUs '
                        'give 512 with --cluster-batch 32')
    g.add_argument('--lr', type=float, default=None,
                   help='base learning rate for a global batch of 256, scaled linearly (0.3; '
                        'synthetic preset 2.4: its 160 steps at batch 32 barely move LARS-scaled '
                        'weights at 0.3)')
    g.add_argument('--lr-k-scale', action=argparse.BooleanOptionalAction, default=True,
                   help='multiply the lr by K/16 with the epoch\'s K (the reference\'s default)')
    g.add_argument('--warmup-epochs', type=float, default=None, help='linear lr warmup (3; preset 1)')
    g.add_argument('--optimizer', default=None, choices=sorted(OPTIMIZERS),
                   help='LARS (the paper\'s; default for a ResNet) or AdamW with a cosine weight '
                        'decay schedule and gradient clipping, as DINO trains ViTs (default for a '
                        'ViT; its lr default is 5e-4 per 256 images)')
    g.add_argument('--weight-decay', type=float, default=None,
                   help='weight decay: LARS\'s (1e-6), AdamW\'s at the start (0.04)')
    g.add_argument('--weight-decay-end', type=float, default=None,
                   help='AdamW\'s weight decay at the end of the cosine schedule (0.4)')
    g.add_argument('--clip-grad', type=float, default=None,
                   help='clip the gradients\' total norm to this (AdamW 3.0; LARS 0: off)')
    g.add_argument('--ema', type=float, default=0.99,
                   help='target EMA momentum at the start (-> 1 on a cosine): per step at the '
                        'paper\'s global batch of 4096, scaled to this run\'s (see --ema-batch-scale)')
    g.add_argument('--ema-batch-scale', action=argparse.BooleanOptionalAction, default=None,
                   help='use --ema ** (global batch / 4096) per step, the paper\'s horizon in '
                        'images (on; synthetic preset off: --ema per step, so that its few hundred '
                        'steps move the target)')

    g = p.add_argument_group('run')
    g.add_argument('--output-dir', default=None,
                   help='where checkpoints, logs and pictures go (runs/<data>-<k-schedule>, '
                        'with -<arch> for a ViT); a checkpoint.pt already there is resumed')
    g.add_argument('--resume', default=None, help='continue from this checkpoint.pt')
    g.add_argument('--seed', type=int, default=0, help='any non-negative integer')
    g.add_argument('--save-every', type=int, default=None,
                   help='keep a copy of the checkpoint every N epochs (25; preset 4)')
    g.add_argument('--vis-every', type=int, default=None,
                   help='write a mask picture every N epochs and after the last (10; preset 1; '
                        '0: none)')
    g.add_argument('--print-freq', type=int, default=None, help='progress line every N steps')
    g.add_argument('--stop-after', type=int, default=None,
                   help='stop after this many epochs in this run (to fit a job time limit); '
                        'start again with the same command to continue')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=True,
                   help='bf16 autocast where the device supports it (never on CPU)')
    g.add_argument('--deterministic', action='store_true',
                   help='the same bits every run on a GPU too: deterministic CUDA algorithms '
                        '(cuDNN, cuBLAS) and k-means sums by a matrix product instead of atomic '
                        'additions (on a CPU runs are deterministic without it)')
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    return p


def resolve_args(args):
    """Fill the data-dependent defaults and derived names; a bad value is a DataError. Returns args."""
    preset = DEMO if args.data == 'synthetic' else PAPER
    arch = args.arch or preset['arch']
    if args.optimizer is None:
        args.optimizer = 'adamw' if arch in VIT_ARCHS else 'lars'
    if args.optimizer == 'lars' and args.weight_decay_end is not None:
        raise data.DataError('--weight-decay-end is AdamW\'s (--optimizer adamw)')
    for key, value in [*OPTIMIZERS[args.optimizer].items(), *preset.items()]:
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = default_workers()
    try:
        with torch.device('meta'):                     # the shapes only, no memory
            maps = feature_maps(build_encoder(args.arch))
    except ValueError as e:
        raise data.DataError(str(e)) from None
    stride = maps['stride'][maps['pool']]
    if args.output_dir is None:
        # the name as given, a link not resolved: --data imagenet100 -> runs/imagenet100-...
        name = 'synthetic' if args.data == 'synthetic' else Path(os.path.abspath(args.data)).name
        sched = args.k_schedule + (str(args.k_max) if args.k_schedule == 'constant' else '')
        vit = f'-{args.arch}' if args.arch in VIT_ARCHS else ''     # beside a ResNet run
        args.output_dir = str(Path('runs') / f'{name}-{sched}{vit}')
    if args.image_size % stride:
        raise data.DataError(f'--image-size must be a multiple of {stride} for {args.arch} '
                             f'(got {args.image_size})')
    if args.seed < 0:
        raise data.DataError(f'--seed must be a non-negative integer (got {args.seed})')
    group = args.cluster_batch
    if group is not None and (group < 1 or args.batch_size % group):
        raise data.DataError(f'--batch-size {args.batch_size} is not a multiple of --cluster-batch '
                             f'{args.cluster_batch}')
    return args


def build_model(arch='resnet50', hidden_dim=4096, out_dim=256, merge_empty_rows=False,
                image_size=224):
    """R2O with a torchvision ResNet or ViT (for image_size inputs); merge_empty_rows: its heads
    computed by heads_merging_empty_rows (the same numbers, faster where the device answers
    without a wait)."""
    return R2O(build_encoder(arch, image_size), hidden_dim, out_dim,
               heads_merging_empty_rows if merge_empty_rows else heads)


def build_optimizer(model, args):
    """--optimizer: LARS (LARSForeach, the same update as LARS) or AdamW, DINO's groups."""
    if args.optimizer == 'adamw':
        return torch.optim.AdamW(adamw_param_groups(model), lr=0.0, weight_decay=args.weight_decay)
    return LARSForeach(lars_param_groups(model), weight_decay=args.weight_decay)


SEEDINGS = dict(rounds=kmeans_seeds_in_rounds, greedy=kmeans_seeds)


def clustering(seeding='greedy', deterministic=False):
    """The clustering a run refines with, and draws its mask pictures and evaluates with: kmeans
    with --kmeans-seeding's seeding ('greedy': kmeans_seeds, the reference's greedy k-means++;
    'rounds': kmeans_seeds_in_rounds) and, with deterministic, its one-hot sums."""
    return functools.partial(kmeans, seeding=SEEDINGS[seeding], deterministic=deterministic)


def run_constants(args, rank, world, device, steps_per_epoch):
    """What a step needs besides the model and the data: device, schedule lengths, the global
    batch and the EMA's batch ratio, precision, the clustering and its groups."""
    global_batch = args.batch_size * world
    bf16 = args.amp and device.type == 'cuda' and torch.cuda.is_bf16_supported()
    # a GPU's index_add_ adds floats atomically in a varying order; a CPU's is deterministic
    deterministic_sums = args.deterministic and device.type == 'cuda'
    return dict(device=device, rank=rank, world=world, global_batch=global_batch,
                total_steps=args.epochs * steps_per_epoch,
                warmup_steps=int(args.warmup_epochs * steps_per_epoch),
                ema_batch_ratio=global_batch / PAPER_GLOBAL_BATCH if args.ema_batch_scale else 1.0,
                bf16=bf16, channels_last=device.type == 'cuda',
                autocast=(functools.partial(torch.autocast, 'cuda', dtype=torch.bfloat16) if bf16
                          else nullcontext),
                kmeans_iters=args.kmeans_iters, cluster_batch=args.cluster_batch,
                cluster=clustering(args.kmeans_seeding, deterministic_sums),
                last_epoch=args.epochs)


def startup_lines(args, run, n_images, steps_per_epoch, device, skipped=()):
    """What the run will do, and on a dataset run how its batch, lr and EMA compare with the
    paper's (global batch 4096, lr 4.8 x K/16, EMA 0.99 per step). skipped: the dataset's
    entries that are not images (links to nothing), named in one line."""
    B, world = run['global_batch'], run['world']
    k16 = ' x K/16' if args.lr_k_scale else ''
    momentum = args.ema ** run['ema_batch_ratio']
    lines = [f'{n_images} images, {world} process(es) x batch {args.batch_size} = global batch {B}, '
             f'{steps_per_epoch} steps/epoch, device {device}'
             f'{", bf16 autocast" if run["bf16"] else ", fp32"}'
             f'{", deterministic" if args.deterministic else ""}']
    if skipped:
        lines.append(data.skipped_line(skipped))
    local = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    lines.append(f'loader: {args.workers} worker processes per training process'
                 + (f' (of {os.cpu_count()} cores on this node, {local} training process(es))'
                    if args.data != 'synthetic' else ''))
    if args.optimizer == 'adamw':
        clip = f'gradient norm clipped to {args.clip_grad:g}' if args.clip_grad else 'no clipping'
        lines.append(f'optimizer: AdamW, weight decay {args.weight_decay:g} -> '
                     f'{args.weight_decay_end:g} (cosine; biases and norms none), {clip}')
    lines += [f'this run:  global batch {B:>4}, lr {args.lr:g} x {B}/256 = {args.lr * B / 256:.4g}{k16}, '
              f'EMA momentum {momentum:.5f} per step at the start'
              + (f' ({args.ema:g}^({B}/{PAPER_GLOBAL_BATCH}): the paper\'s horizon in images)'
                 if args.ema_batch_scale else ' (--ema per step, not scaled to the batch)')]
    if args.data != 'synthetic':
        P = PAPER_GLOBAL_BATCH
        lines.append(f'the paper: global batch {P}, lr 0.3 x {P}/256 = {0.3 * P / 256:g} x K/16, '
                     f'EMA momentum 0.99 per step at the start')
        if B != P:
            base = f'r2o.py --data {args.data}'
            lines.append(f'the paper\'s global batch: torchrun --nproc_per_node=8 {base} '
                         f'--batch-size {P // 8} --cluster-batch 32 on 8 GPUs, or torchrun '
                         f'--nnodes=2 --nproc_per_node=8 ... {base} --batch-size {P // 16} '
                         f'--cluster-batch 32 on 16')
    return lines


# ================================ main ================================

def build_dataset(args):
    cache = None if args.superpixel_cache == 'none' else args.superpixel_cache
    common = dict(image_size=args.image_size, n_segments=args.superpixels,
                  slic_compactness=args.slic_compactness, slic_sigma=args.slic_sigma,
                  slic_input=args.slic_input, flip_p=args.flip_p, blur=args.blur,
                  cache_dir=cache, seed=args.seed, superpixel_map=superpixel_map,
                  photometric_on=args.photometric_on, resample=args.resample)
    if args.data == 'synthetic':
        return data.SyntheticDataset(n_images=args.synthetic_images,
                                     scene_size=2 * args.image_size, **common)
    return data.ImageFolderDataset(args.data, listing=listing_of_the_job(args.data), **common)


def listing_of_the_job(root):
    """find_images(root), scanned once for the whole job: rank 0 scans and sends the list (one
    buffer, data.PathList) to the other processes, instead of every rank walking the folders.
    A refusal is sent too, so every rank stops with the same one line. None without a process
    group (the dataset scans itself)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [data.find_images(root)]
        except data.DataError as e:
            box = [e]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], data.DataError):
        raise box[0]
    return box[0]


def prebuild_superpixels(dataset, workers, rank=0):
    """Compute every image's superpixels into the dataset's cache with `workers` processes.

    Rows already valid are skipped (an interrupted prebuild resumes), and each process takes the
    images in an order of its own, so several nodes sharing the cache folder mostly compute
    different rows (a row computed twice is written with the same bytes)."""
    if dataset.cache is None:
        raise data.DataError('--prebuild-superpixels needs a cache: not --superpixel-cache none')
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(
        hash((os.uname().nodename, os.getpid(), rank)) % 2**63)).tolist()
    loader = torch.utils.data.DataLoader(data.SuperpixelsOnly(dataset), batch_size=64,
                                         sampler=order, num_workers=workers,
                                         collate_fn=lambda done: done)
    counts, start, n = {1: 0, 0: 0, -1: 0}, time.time(), len(dataset)
    print(f'superpixels of {n} images into {dataset.cache.path}, {workers} processes', flush=True)
    for i, done in enumerate(loader):
        for d in done:
            counts[d] += 1
        seen = sum(counts.values())
        if (i + 1) % 50 == 0 or seen == n:
            rate = seen / (time.time() - start)
            print(f'{seen}/{n}: {counts[1]} computed, {counts[0]} were cached, {counts[-1]} '
                  f'unreadable; {rate:.0f} img/s, eta {fmt_time((n - seen) / rate)}', flush=True)
    print(f'done: {dataset.cache.path} holds the superpixels of {counts[1] + counts[0]} of {n} '
          f'images, in {fmt_time(time.time() - start)}', flush=True)


def cache_line(dataset, workers, world, sample=1000):
    """One start-up line: how full the superpixel cache is (a sample of rows) and what the first
    epoch spends on SLIC for the rest, timed on one image now."""
    if dataset.cache is None:
        return 'superpixel cache: none (SLIC runs for every sample, every epoch)'
    rows = np.linspace(0, len(dataset) - 1, min(sample, len(dataset))).round().astype(int)
    share = dataset.cache.filled(np.unique(rows)) / len(np.unique(rows))
    if share == 1:
        return f'superpixel cache: full ({dataset.cache.path})'
    _, image, _ = dataset.load_checked(int(rows[0]))
    start = time.process_time()
    dataset.compute_superpixels(image)
    core_s = (time.process_time() - start) * (1 - share) * len(dataset)
    wall = fmt_time(core_s / max(1, workers * world))
    return (f'superpixel cache: {100 * share:.0f}% filled ({dataset.cache.path}): the first epoch '
            f'computes SLIC for the rest, about {core_s / 3600:.1f} core-hours ({wall} with '
            f'{workers} workers x {world} process(es)); --prebuild-superpixels fills it first '
            'with every core')


def default_workers():
    """Loader processes per training process: this node's cores (those this process may use)
    shared among its training processes (torchrun's LOCAL_WORLD_SIZE), one core each left to
    the training process itself. 11 for 8 GPUs on 96 cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) - 1)


def build_loader(dataset, args, rank, world, device):
    """This rank's shard of a seeded, per-epoch shuffle, in batches of args.batch_size."""
    sampler = data.EpochSampler(torch.utils.data.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed % 2**63,
        drop_last=True))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=data.collate, pin_memory=device.type == 'cuda', drop_last=True,
        persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise data.DataError(f'{len(dataset)} images are fewer than one batch of '
                             f'{args.batch_size} x {world} processes')
    return sampler, loader


def make_deterministic():
    """Deterministic CUDA algorithms, before CUDA starts: cuBLAS needs its workspace setting in
    the environment before its first call, cuDNN its flags."""
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def main(args):
    resolve_args(args)
    if args.deterministic:
        make_deterministic()
    ddp, rank, world, device = setup_distributed(args)
    torch.manual_seed(args.seed % 2**63)        # the same initial weights on every rank
    output_dir = Path(args.output_dir)
    ckpt_path = Path(args.resume) if args.resume else output_dir / 'checkpoint.pt'
    if args.resume and not ckpt_path.is_file():
        raise data.DataError(f'--resume {ckpt_path}: no such file')
    if rank == 0:
        print('settings:\n' + '\n'.join(f'  {k}: {v}' for k, v in sorted(vars(args).items())),
              flush=True)

    # ===== preparing data =====
    dataset = build_dataset(args)
    if args.prebuild_superpixels:
        return prebuild_superpixels(dataset, args.workers, rank)
    sampler, loader = build_loader(dataset, args, rank, world, device)
    if rank == 0:              # only now: a run refused above leaves nothing on disk
        output_dir.mkdir(parents=True, exist_ok=True)
    vis = batch_to_device(data.collate([dataset[(0, i)] for i in picture_indices(len(dataset))]),
                          device)

    # ===== building networks and optimizer =====
    # On a CPU the empty masks' rows go through the heads once, counted (4x faster at K=128);
    # on a GPU counting them would wait for the device, and all rows cost little there.
    model = build_model(args.arch, args.hidden_dim, args.out_dim,
                        merge_empty_rows=device.type == 'cpu', image_size=args.image_size).to(device)
    if ddp and device.type == 'cuda':      # SyncBatchNorm needs GPUs; gloo ranks keep plain BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    run = run_constants(args, rank, world, device, len(loader))
    if run['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    if rank == 0:
        print('\n'.join(startup_lines(args, run, len(dataset), len(loader), device,
                                       dataset.skipped)), flush=True)
        if args.data != 'synthetic':
            print(cache_line(dataset, args.workers, world), flush=True)

    # ===== resume =====
    start_epoch, step = 0, 0
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
            kept = output_dir / f'checkpoint-epoch{epoch + 1:04d}.pt'
            save_or_stop(ckpt, output_dir / 'checkpoint.pt', epoch)
            if (epoch + 1) % args.save_every == 0:
                save_or_stop(ckpt, kept, epoch + 1)
            with open(output_dir / 'log.txt', 'a') as f:
                f.write(json.dumps(stats) + '\n')
            print(json.dumps(stats), flush=True)
        if args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
            k = k_schedule(epoch + 1, args.epochs, args.k_schedule, args.k_max, args.k_min)
            path = output_dir / f'masks-epoch{epoch + 1:04d}.png' if rank == 0 else None
            visualize(model, vis, k, run, path,
                      f'epoch {epoch + 1}/{args.epochs}  K={k if k is not None else "superpixels"}')

    if rank == 0 and last_epoch == args.epochs:
        backbone = {k: v.cpu() for k, v in model.encoder.state_dict().items()}
        save_or_stop(backbone, output_dir / 'backbone.pt', last_epoch)
        kind = (f'VisionTransformer ({args.arch}, image_size={args.image_size})'
                if args.arch in VIT_ARCHS else args.arch)
        print(f'done: {output_dir}/backbone.pt (torchvision {kind} state_dict), '
              'checkpoint.pt, log.txt' + (', masks-epoch*.png' if args.vis_every else ''), flush=True)
    if ddp:
        dist.destroy_process_group()


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
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file.

    The bytes are made in memory and written by Python, so a full disk is the OSError it is
    (torch's own file writer reports it as an unrelated RuntimeError); the partial file is
    removed before the error goes on."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = Path(str(path) + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def save_or_stop(obj, path, epochs_done):
    """save_atomic; a full disk stops the run with one line that names what is intact."""
    try:
        save_atomic(obj, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last = Path(path).parent / 'checkpoint.pt'
        if path != last and last.is_file():
            intact = f'{last} (after epoch {epochs_done}) is intact'
        elif last.is_file():
            intact = f'{last} (after epoch {epochs_done}) is intact and unchanged'
        else:
            intact = 'no checkpoint was written yet'
        raise data.DataError(f'the disk holding {Path(path).parent} is full ({e.strerror}): '
                             f'{Path(path).name} was not written and its partial file removed; '
                             f'{intact}: free some space and run the same command to continue '
                             'from it') from None


# Flags a resumed run may change: where and how it runs, not what a step computes; --lr and
# --amp too, the way out of a diverged run. Every other flag must match the checkpoint's.
FREE_ON_RESUME = ('output_dir', 'resume', 'stop_after', 'save_every', 'vis_every', 'print_freq',
                  'workers', 'superpixel_cache', 'max_bad_fraction', 'device', 'amp', 'lr',
                  'deterministic')


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
