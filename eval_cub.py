"""Unsupervised object segmentation with a frozen encoder: cluster each image, score against masks.

The paper reports that an ImageNet-pretrained R2O encoder segments the birds of CUB-200-2011
with no training on CUB (71.6 mIoU, K=5). This script makes that kind of number checkable: every
choice of the protocol is a flag, and all of them are printed with the result and written to
the --out JSON file (default: results.json in the current folder).

Per image: resize to --input-size (aspect not kept, like R2O's raw view), SLIC superpixels as in
training, encoder features (layer3 by default), superpixel features pooled and L2-normalised,
k-means with K clusters (per image), the cluster map brought to the ground-truth resolution,
then each cluster named foreground or background by two rules: majority vote against the ground
truth, and a label-free rule (the clusters that touch the image border least for their size
are foreground). Metrics: foreground IoU and mIoU = mean(foreground IoU, background
IoU), per image, averaged over images.

Built-in set (no download: generated single-object scenes with masks, seconds on a CPU):
    python eval_cub.py runs/synthetic-cosine/checkpoint.pt
    python eval_cub.py --random-init          # the untrained encoder, same protocol
    python eval_cub.py --colour-baseline      # no network: superpixels clustered by mean Lab colour
From nothing to the paper's figure (downloads CUB into datasets/ and the authors' weights into
torch's hub cache, once each; FILE: a file name shown on https://huggingface.co/KonstantinosKK/r2o):
    python eval_cub.py https://huggingface.co/KonstantinosKK/r2o/resolve/main/FILE \
        --data datasets --download
CUB-200-2011 (the official 5,794-image test split; GPU when present):
    python eval_cub.py backbone.pt --data /path/to/CUB_200_2011 --save-vis vis/
    python eval_cub.py --colour-baseline --data /path/to/CUB_200_2011
    python eval_cub.py --random-init --arch resnet50 --data /path/to/CUB_200_2011
The CUB folder is CUB_200_2011/ from CUB_200_2011.tgz (images.txt, train_test_split.txt,
images/) with segmentations/ from the separate segmentations.tgz unpacked inside it or beside it.
--data PATH --download makes PATH/CUB_200_2011/ with segmentations/ inside when PATH lacks it
(checked archives, all-or-nothing unpacking; see fetch_cub); without --download, a missing CUB
is one line giving the command with --download.

Weights: a file, or a URL (https://, http://, file://) downloaded once into torch's hub cache
(torch.hub.get_dir()/checkpoints/) and read like a file. The layout is recognised from the file's
keys, no flag needed (see load_encoder).
    ours: a training checkpoint.pt (online encoder; --encoder target for the EMA one) or backbone.pt
    the R2O authors' training checkpoint (DDP 'module.online_network.encoder.*' keys):
        python eval_cub.py r2o_checkpoint.pth --data /path/to/CUB_200_2011
        python eval_cub.py r2o_checkpoint.pth --data /path/to/CUB_200_2011 --encoder target
    a torchvision ResNet state_dict (the authors' released weights; 'module.', 'encoder.',
    'backbone.' prefixes and fc.* are fine):
        python eval_cub.py r2o_resnet50.pth --data /path/to/CUB_200_2011
    detectron2 (.pkl of numpy arrays, as tools/convert-torchvision-to-d2.py writes, or a detector
    trained from one: its backbone's ResNet is taken):
        python eval_cub.py model_final.pkl --data /path/to/CUB_200_2011
    (the names are mapped to torchvision's, so the network must be torchvision's ResNet, RGB input
    and stride in the 3x3 conv, STRIDE_IN_1X1: False, as the authors' detectron2 config has it;
    detectron2's own MSRA ResNets load too but are a different network)
    a ViT: our backbone.pt of an --arch vit_s_16 / vit_b_16 run (a torchvision VisionTransformer
    state_dict), or DINO's released ViT-S/16 and ViT-B/16 (timm's names, mapped onto
    torchvision's VisionTransformer; the position embedding is interpolated for another input
    size than 224); k-means runs on the patch tokens of block 9 of 12 (--layer):
        python eval_cub.py https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth \
            --data /path/to/CUB_200_2011
        python eval_cub.py https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth \
            --data /path/to/CUB_200_2011
A .pkl is read with an unpickler that builds numpy arrays and plain containers only, and torch's
files with torch.load(weights_only=True), so a weights file cannot run code here, whether it
comes from disk or from a URL.
"""
import argparse
import gzip
import hashlib
import http.client
import importlib
import json
import math
import os
import pickle
import posixpath
import re
import shlex
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from skimage.color import rgb2lab
from torch.utils.data import DataLoader, Dataset

import data
import r2o

# Protocol defaults per data set. They never depend on the encoder, so the references (random
# init, colour) printed beside an encoder are computed the same way. CUB: the paper's training
# resolution and superpixels. Built-in scenes: their own 128 px (the demo trains at 64 px on
# crops of 128 px scenes, so objects at 128 px are within its range of scales; at 64 px layer3
# is a 4 x 4 grid, too coarse to outline anything), with the demo's 24 superpixels per image.
SLIC_KEYS = ('superpixels', 'slic_compactness', 'slic_sigma')
BUILTIN = dict(arch=r2o.DEMO['arch'], input_size=128, **{k: r2o.DEMO[k] for k in SLIC_KEYS})
CUB = dict(arch=r2o.PAPER['arch'], input_size=r2o.PAPER['image_size'],
           **{k: r2o.PAPER[k] for k in SLIC_KEYS})


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description='R2O unsupervised object segmentation (CUB-200-2011)',
                                add_help=add_help,
                                formatter_class=r2o.HelpFormatter)
    g = p.add_argument_group('what to evaluate (one of)')
    g.add_argument('checkpoint', nargs='?', default=None,
                   help="weights, a file or a URL (https://, http://, file://: downloaded once into "
                        "torch's hub cache, TORCH_HOME/hub/checkpoints/), the layout recognised "
                        "from the keys: our training checkpoint.pt or "
                        "backbone.pt; the R2O authors' training checkpoint (r2o_checkpoint.pth, "
                        "'module.online_network.encoder.*'); a torchvision ResNet state_dict "
                        "(prefixes module./encoder./backbone. and a classifier's fc.* are fine); "
                        "a detectron2 .pkl (model_final.pkl, read as numpy arrays only); a "
                        "torchvision VisionTransformer state_dict (our ViT backbone.pt) or a "
                        "timm-style ViT (DINO's dino_deitsmall16_pretrain.pth, "
                        "dino_vitbase16_pretrain.pth)")
    g.add_argument('--random-init', action='store_true',
                   help='the untrained encoder (seeded by --seed): the reference any training must beat')
    g.add_argument('--colour-baseline', '--color-baseline', dest='colour_baseline',
                   action='store_true',
                   help='no network: cluster superpixels by their mean Lab colour (the no-learning '
                        'reference; majority vote is generous, so this is the one to beat)')
    g.add_argument('--arch', default=None,
                   help='resnet18/34/50/101/152, vit_s_16, vit_b_16; read from the file when not '
                        'given (random init: resnet18 on the built-in set, resnet50 on CUB)')
    g.add_argument('--encoder', default=None, choices=['online', 'target'],
                   help='which encoder of a training checkpoint, ours or the authors\' (default '
                        'online, the one exported as backbone.pt; target is the EMA network)')

    g = p.add_argument_group('data')
    g.add_argument('--data', default='builtin',
                   help='"builtin" (generated single-object scenes with masks) or the CUB_200_2011 '
                        'folder (or the folder holding it)')
    g.add_argument('--download', action='store_true',
                   help='when --data does not hold CUB-200-2011 yet, download it there from '
                        'Caltech (CUB_200_2011.tgz, about 1.1 GB, and segmentations.tgz), check '
                        'both archives and unpack them: --data PATH then holds '
                        'PATH/CUB_200_2011/ with segmentations/ inside, found without --download '
                        'afterwards. An interrupted download resumes; the archives are removed once '
                        f'unpacked. Mirror: set {CUB_MIRROR_VARIABLE} to a URL or folder holding '
                        'both files')
    g.add_argument('--split', default='test',
                   help='CUB images: test (the official 5,794), train, all, or a file: one image id '
                        'per line (as in images.txt), or two columns "<id> <flag>" as in CUB\'s '
                        'train_test_split.txt (flag 1 = train, 0 = test), of which the 0-flag '
                        '(test) images are evaluated')
    g.add_argument('--mask-threshold', type=int, default=128,
                   help='CUB masks are soft (0-255): a pixel is foreground at this value or above')
    g.add_argument('--builtin-images', type=int, default=500, help='size of the built-in set')
    g.add_argument('--limit', type=int, default=None,
                   help='evaluate only the first N images (quick checks; CUB lists its images by '
                        'class, so the first ones are all one species)')

    g = p.add_argument_group('protocol')
    g.add_argument('--input-size', type=int, default=None,
                   help='images are resized to this square (aspect not kept, as R2O\'s raw view); '
                        'a multiple of 32 for a ResNet, of 16 for a ViT (224 on CUB, 128 on the built-in set)')
    g.add_argument('--layer', default=None,
                   help=f'encoder features to cluster (default: what R2O clusters in training, '
                        f'r2o.feature_maps). A ResNet: {r2o.CLUSTER_LAYER} (stride '
                        f'{r2o.STRIDE[r2o.CLUSTER_LAYER]}) or {r2o.POOL_LAYER} (stride '
                        f'{r2o.STRIDE[r2o.POOL_LAYER]}, the exported output); a ViT: the patch '
                        f'tokens of blockN (N from 1; default the block '
                        f'{r2o.VIT_CLUSTER_FROM_END} before the last, block9 of 12) or '
                        f'{r2o.VIT_POOL_LAYER} (the last block\'s after the final LayerNorm, the '
                        f'exported output), stride 16')
    g.add_argument('--regions', default='superpixels', choices=['superpixels', 'grid'],
                   help='what k-means groups: SLIC superpixels with features pooled inside them, as '
                        'in training, or the cells of the feature grid')
    g.add_argument('--superpixels', type=int, default=None,
                   help='SLIC n_segments, computed at --input-size and stored at input-size/4 as in '
                        'training (100 on CUB, 24 on the built-in set)')
    g.add_argument('--slic-compactness', type=float, default=None,
                   help='SLIC compactness, as in training (10 on CUB, 30 on the built-in set)')
    g.add_argument('--slic-sigma', type=float, default=None,
                   help='SLIC pre-smoothing, as in training (0 on CUB, 1 on the built-in set)')
    g.add_argument('--k', type=int, default=5, help='k-means clusters per image')
    g.add_argument('--kmeans-iters', type=int, default=30, help='Lloyd iterations (r2o.kmeans)')
    g.add_argument('--kmeans-seeding', default='greedy', choices=sorted(r2o.SEEDINGS),
                   help='k-means seeding, as in training (r2o.py --kmeans-seeding): the '
                        'reference\'s greedy k-means++ or D^2 in rounds')
    g.add_argument('--seed', type=int, default=0, help='k-means seeding (per image) and random init')

    g = p.add_argument_group('run')
    g.add_argument('--out', default='results.json', help='write protocol and metrics here (JSON)')
    g.add_argument('--batch-size', type=int, default=64, help='images per network forward')
    g.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='loader processes (decoding and SLIC run there)')
    g.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    g.add_argument('--print-freq', type=int, default=10, help='progress line every N batches')
    g.add_argument('--save-vis', default=None, metavar='DIR',
                   help='write PNG grids (image | ground truth | clusters | foreground by each rule)')
    g.add_argument('--vis-count', type=int, default=16, help='how many images --save-vis draws')
    return p


def resolve_args(args):
    """Check the choice of encoder and fill the data-dependent defaults. Returns args."""
    chosen = [name for name, on in (('CKPT', args.checkpoint is not None),
                                    ('--random-init', args.random_init),
                                    ('--colour-baseline', args.colour_baseline)) if on]
    if len(chosen) != 1:
        raise data.DataError('give exactly one of CKPT, --random-init, --colour-baseline'
                             + (f' (got {" and ".join(chosen)})' if chosen else ''))
    if args.encoder is not None and args.checkpoint is None:
        raise data.DataError('--encoder applies to a training checkpoint only')
    if args.download and args.data == 'builtin':
        raise data.DataError('--download needs --data PATH: the folder to put CUB-200-2011 in')
    preset = BUILTIN if args.data == 'builtin' else CUB
    for key in ('input_size', *SLIC_KEYS):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.random_init and args.arch is None:
        args.arch = preset['arch']
    if args.input_size % 16:
        raise data.DataError(f'--input-size must be a multiple of 16 (got {args.input_size})')
    if args.k < 1:
        raise data.DataError(f'--k must be at least 1 (got {args.k})')
    return args


# ================================ reading CUB-200-2011 ================================

def find_cub(root):
    """The CUB_200_2011 folder and its segmentations folder, or one DataError saying what is
    missing and where it looked. `root` may be CUB_200_2011 itself or the folder holding it."""
    root = Path(root)
    if not root.is_dir():
        raise data.DataError(f'--data {root}: no such folder')
    cub = root / 'CUB_200_2011' if (root / 'CUB_200_2011').is_dir() else root
    missing = [str(cub / name) for name in CUB_FILES
               if not (cub / name).exists()]
    places = [cub / 'segmentations', cub.parent / 'segmentations']
    segmentations = next((s for s in places if s.is_dir()), None)
    if segmentations is None:
        missing.append('segmentations/ (looked in ' + ' and '.join(map(str, places)) +
                       '; it comes from the separate segmentations.tgz: unpack it inside or '
                       'beside CUB_200_2011/)')
    if missing:
        raise data.DataError(f'--data {root} is not a complete CUB-200-2011 folder, missing: '
                             + '; '.join(missing))
    return cub, segmentations


def read_split_file(path):
    """Image ids from a --split file (lines starting with # are comments).

    One column: a list of ids, as in images.txt. Two columns "<id> <flag>": read like CUB's
    train_test_split.txt (flag 1 = train, 0 = test), which selects the 0-flag (test) images;
    reading only the first column would silently select every image of such a file.
    Any other shape is a DataError naming the line."""
    ids, width = [], None
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        columns = line.split()
        if not columns or columns[0].startswith('#'):
            continue
        width = width or len(columns)
        where = f'--split {path}, line {number} {line.strip()!r}'
        if len(columns) != width or width > 2:
            raise data.DataError(f'{where}: every line must hold one image id, or "<id> <0|1>" '
                                 'as in train_test_split.txt')
        if not (columns[0].isascii() and columns[0].isdigit()) or (
                width == 2 and columns[1] not in ('0', '1')):
            raise data.DataError(f'{where}: expected an integer image id'
                                 + (' and a flag 0 (test) or 1 (train)' if width == 2 else ''))
        if width == 1 or columns[1] == '0':
            ids.append(int(columns[0]))
    return ids


def read_cub(root, split='test'):
    """The images of one split with their masks: a list of (image id, image path, mask path).

    split: 'test' (the official 5,794), 'train', 'all', or a file (see read_split_file). Every listed
    file is checked up front so a missing one stops the run before any work."""
    cub, segmentations = find_cub(root)
    names = {}
    for line in (cub / 'images.txt').read_text().splitlines():
        if line.strip():
            image_id, name = line.split(maxsplit=1)
            names[int(image_id)] = name.strip()
    if split in ('test', 'train'):
        is_train = {}
        for line in (cub / 'train_test_split.txt').read_text().splitlines():
            if line.strip():
                image_id, flag = line.split()
                is_train[int(image_id)] = flag == '1'
        ids = [i for i in names if is_train.get(i) == (split == 'train')]
    elif split == 'all':
        ids = list(names)
    else:
        if not Path(split).is_file():
            raise data.DataError(f'--split {split}: not test, train, all or a file of image ids')
        ids = read_split_file(split)
        unknown = [i for i in ids if i not in names]
        if unknown:
            raise data.DataError(f'--split {split}: {len(unknown)} ids not in {cub / "images.txt"}, '
                                 f'e.g. {unknown[:5]}')
    items = [(i, cub / 'images' / names[i], segmentations / Path(names[i]).with_suffix('.png'))
             for i in sorted(ids)]
    lacking = [str(p) for item in items for p in item[1:] if not p.is_file()]
    if lacking:
        raise data.DataError(f'{len(lacking)} files listed in {cub / "images.txt"} are missing, '
                             f'e.g. {", ".join(lacking[:3])}')
    if not items:
        raise data.DataError(f'--split {split}: no images')
    return items


def load_mask(path, threshold=128):
    """A CUB mask (soft, 0-255; sometimes saved with colour channels) as H x W bools."""
    with Image.open(path) as m:
        return np.asarray(m.convert('L')) >= threshold


# ================================ downloads: CUB-200-2011, weights by URL ================================

# The two archives --download fetches, in the order it fetches them (the small one first, so a
# failure costs little). Nothing here could be checked against the real files where this was
# written (no network): size, md5 and sha256 stay None until someone fills them in from the files
# themselves (Caltech's record pages publish md5s). Until then an archive is accepted when it is a
# complete, readable gzip tar that holds `members` (a name ending in / is a folder: any member
# under it counts). `into`: unpacked into the folder that holds CUB_200_2011/ ('root') or into
# CUB_200_2011/ itself ('cub'). A mirror replaces the URLs' folder: the environment variable
# R2O_CUB_MIRROR, a URL or a local folder holding both files under these names.
CUB_ARCHIVES = {
    'segmentations': dict(
        url='https://data.caltech.edu/records/w9d68-gec53/files/segmentations.tgz',
        file='segmentations.tgz', size=None, md5=None, sha256=None,
        members=('segmentations/',), into='cub'),
    'images': dict(
        url='https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz',
        file='CUB_200_2011.tgz', size=None, md5=None, sha256=None,     # about 1.1 GB
        members=('CUB_200_2011/images.txt', 'CUB_200_2011/train_test_split.txt',
                 'CUB_200_2011/images/'), into='root'),
}
CUB_MIRROR_VARIABLE = 'R2O_CUB_MIRROR'
# what find_cub needs in the CUB_200_2011 folder, besides segmentations/ inside or beside it
CUB_FILES = ('images.txt', 'train_test_split.txt', 'images')


def is_url(text):
    """Whether a weights argument is an address to download (http, https, file) rather than a path."""
    return re.match(r'(https?|file)://', str(text), re.IGNORECASE) is not None


def one_line(error):
    """An exception's message on one line, for a DataError."""
    return ' '.join(str(getattr(error, 'reason', None) or error).split()) or type(error).__name__


def show_progress(done, total, last=False):
    """One progress line: MB so far, of the total with a percentage when the server gave one.
    On a terminal the line is rewritten in place; in a log each one is a line of its own."""
    text = f'  {done / 1e6:,.1f} MB' + (f' of {total / 1e6:,.1f} MB ({100 * done / total:.0f}%)'
                                        if total else '')
    print(text, end='\n' if last or not sys.stdout.isatty() else '\r', flush=True)


def resumed_at(response, have):
    """Where the body of `response` starts in the file: `have` when the server answered the Range
    request with the rest (206 Partial Content from byte `have`), else 0 (it sent the whole file)."""
    match = re.match(r'bytes (\d+)-', response.headers.get('Content-Range', ''))
    return have if have and response.status == 206 and match and int(match[1]) == have else 0


def download(url, path, resume=True):
    """Fetch `url` into `path` with a progress line. Returns path.

    The bytes go to path.part, renamed to path only when complete, so path is never half a file.
    resume=True: a .part left by an interrupted run is continued where the server honours a Range
    request and restarted otherwise, and an interrupted transfer keeps its .part for the next run.
    resume=False: a failed transfer leaves nothing behind. A transfer that ends before the length
    the server announced, an HTTP error or no network is one DataError."""
    path = Path(path)
    part = path.with_name(path.name + '.part')
    have = part.stat().st_size if resume and part.is_file() else 0
    headers = {'User-Agent': 'r2o-eval_cub', **({'Range': f'bytes={have}-'} if have else {})}
    print(f'downloading {url}\n  to {path}', flush=True)
    complete = False
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=60) as response:
            done = resumed_at(response, have)
            length = response.headers.get('Content-Length', '')
            total = done + int(length) if length.isdigit() else None
            if done:
                print(f'  resuming {part} at {done / 1e6:,.1f} MB', flush=True)
            with open(part, 'ab' if done else 'wb') as f:
                shown = time.time()
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if time.time() - shown > 2:
                        show_progress(done, total)
                        shown = time.time()
            show_progress(done, total, last=True)
        if total is not None and done != total:
            raise data.DataError(
                f'{url}: the download stopped at {done:,} of {total:,} bytes: run the same '
                'command again to ' + (f'resume it ({part} is kept)' if resume else 'retry'))
        part.replace(path)
        complete = True
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:           # the .part is not a prefix the server can continue
            part.unlink()
            return download(url, path, resume)
        raise data.DataError(f'{url}: download failed (HTTP {e.code} {one_line(e)}): check the '
                             'address') from None
    except (OSError, http.client.HTTPException) as e:     # URLError (no network) is an OSError
        kept = resume and part.is_file() and part.stat().st_size > 0
        raise data.DataError(f'{url}: download failed ({one_line(e)}): check the address and the '
                             'connection' + (f', then run the same command again to resume '
                                             f'({part} is kept)' if kept else '')) from None
    finally:
        if not complete and not resume:
            part.unlink(missing_ok=True)
    return path


def cached_weights(url):
    """The local copy of the weights at `url`, downloaded the first time only.

    Kept where torch.hub keeps downloaded weights, torch.hub.get_dir()/checkpoints/, under the
    file name the URL ends with (so a file torch.hub already fetched is reused). Read it with
    read_weights_file like any file: where it came from changes nothing about what it may hold."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name:
        raise data.DataError(f'{url}: the address does not end with a file name')
    path = Path(torch.hub.get_dir()) / 'checkpoints' / name
    if path.is_file():
        print(f'weights: {url}\n  already downloaded: {path}', flush=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return download(url, path, resume=False)


# Python's tarfile judges each member (filter='data', PEP 706: Python 3.10.12+, 3.11.4+, 3.12+):
# it refuses one that would land outside the folder, a link to an absolute path or pointing
# outside, a device file. On an older Python --download stops in one line before fetching.
TAR_FILTER_PYTHONS = '3.10.12+, 3.11.4+ or 3.12+'


def require_tar_filter():
    """A one-line DataError where this Python's tarfile lacks filter='data'."""
    if not hasattr(tarfile, 'data_filter'):
        raise data.DataError(
            f"--download needs Python {TAR_FILTER_PYTHONS} (tarfile's filter='data', which unpacks "
            f'an archive safely); this is Python {sys.version.split()[0]}: run it with a newer '
            'Python, or unpack CUB-200-2011 yourself and give --data its folder')


# tarfile's data filter could be led out of the folder through links (CPython issue 135034)
# until these releases; before them, a link member is refused outright (CUB's archives hold none).
TAR_LINKS_SAFE = ((3, 10, 18), (3, 11, 13), (3, 12, 11), (3, 13, 4))


def tar_links_safe(version=sys.version_info[:3]):
    """Whether this Python's data filter judges link members safely (TAR_LINKS_SAFE)."""
    return any(version[:2] == safe[:2] and version >= safe for safe in TAR_LINKS_SAFE) or \
        version[:2] > TAR_LINKS_SAFE[-1][:2]


def refuse_unsafe_members(members, archive, dest):
    """A DataError naming the first member of `archive` that must not be unpacked into the folder
    `dest` (which need not exist yet), if any: one tarfile's data filter refuses, or one whose
    name it would rewrite (an absolute path: it drops the leading /), or, on a Python whose
    filter could be led out through links (tar_links_safe), any link. Judged by the names alone,
    before anything is written; safe_extract filters again as it writes, when a link unpacked
    before a member is followed."""
    require_tar_filter()
    links_safe = tar_links_safe()
    for member in members:
        if (member.issym() or member.islnk()) and not links_safe:
            raise data.DataError(
                f'{archive}: refused, {member.name!r} is a link, which this Python\'s tarfile '
                f'({sys.version.split()[0]}) cannot unpack safely (Python 3.10.18+, 3.11.13+, '
                '3.12.11+ or 3.13.4+ can): unsafe to unpack; nothing was unpacked')
        try:
            if tarfile.data_filter(member, str(dest)).name != member.name:
                raise tarfile.AbsolutePathError(member)
        except tarfile.FilterError as e:
            raise data.DataError(f'{archive}: refused, {one_line(e)}: unsafe to unpack; nothing '
                                 'was unpacked') from None


def file_digest(path, algorithm):
    """The hex digest of a file (hashlib's md5, sha256, ...), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_archive(path, facts, dest=None):
    """Refuse an archive that is not the expected one, before anything is unpacked. One DataError
    naming the file, else None.

    facts: an entry of CUB_ARCHIVES. Its size and checksums where known; then the whole gzip
    stream is read (a truncated or damaged file fails here: gzip checks its CRC at the end), every
    member must be safe to unpack into the folder `dest` (refuse_unsafe_members; default: the
    archive's own folder) and every expected member present."""
    path = Path(path)
    size = path.stat().st_size
    if facts.get('size') is not None and size != facts['size']:
        raise data.DataError(f'{path}: {size:,} bytes, expected {facts["size"]:,}: damaged or '
                             'not the expected file')
    for algorithm in ('md5', 'sha256'):
        if facts.get(algorithm) and file_digest(path, algorithm) != facts[algorithm].lower():
            raise data.DataError(f'{path}: wrong {algorithm} checksum: damaged or not the expected '
                                 'file')
    try:
        with gzip.open(path) as stream, tarfile.open(fileobj=stream, mode='r|') as tar:
            members = list(tar)
            while stream.read(1 << 20):   # to the end of the gzip stream, where its CRC is checked
                pass
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise data.DataError(f'{path}: damaged, not a complete .tgz archive '
                             f'({one_line(e)})') from None
    refuse_unsafe_members(members, path, path.parent if dest is None else dest)
    names = {posixpath.normpath(m.name) for m in members}
    missing = [want for want in facts['members'] if not (
        want.rstrip('/') in names or want.endswith('/') and any(n.startswith(want) for n in names))]
    if missing:
        raise data.DataError(f'{path}: not the expected archive, it lacks {", ".join(missing)}')


def safe_extract(archive, dest):
    """Unpack a .tgz into the folder `dest`, all or nothing.

    Every member is checked (refuse_unsafe_members) before anything is written; the archive is
    unpacked with tarfile's filter='data' into a temporary folder inside dest (a killed run's one
    is removed first) and each top-level entry is then renamed into dest, so dest never holds half
    an entry. An entry dest already has is kept, not replaced. Returns the names of the entries
    added."""
    archive, dest = Path(archive), Path(dest)
    temporary = dest / f'.{archive.name}.unpacking'
    shutil.rmtree(temporary, ignore_errors=True)
    added = []
    try:
        with tarfile.open(archive, 'r:gz') as tar:
            members = tar.getmembers()
            refuse_unsafe_members(members, archive, temporary)
            temporary.mkdir(parents=True)
            tar.extractall(temporary, members, filter='data')
        for entry in sorted(temporary.iterdir()):
            if not (dest / entry.name).exists():
                entry.rename(dest / entry.name)
                added.append(entry.name)
    except tarfile.FilterError as e:        # through a link unpacked before it: nothing is kept
        raise data.DataError(f'{archive}: refused, {one_line(e)}: unsafe to unpack; nothing was '
                             'unpacked') from None
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise data.DataError(f'{archive}: could not unpack it into {dest} ({one_line(e)})') from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return added


def archive_url(facts):
    """Where to fetch an archive from: its URL, or the same file name in R2O_CUB_MIRROR (a URL or
    a local folder) when that is set."""
    mirror = os.environ.get(CUB_MIRROR_VARIABLE)
    if not mirror:
        return facts['url']
    base = mirror if '://' in mirror else Path(mirror).resolve().as_uri()
    return base.rstrip('/') + '/' + facts['file']


def fetch_cub(root):
    """Make the folder `root` hold CUB-200-2011 as find_cub reads it: root/CUB_200_2011/ with
    segmentations/ inside, from CUB_ARCHIVES. Returns find_cub(root).

    Only what is missing is fetched (nothing when find_cub already finds it). An archive already in
    root is used rather than downloaded. Each archive is checked (check_archive) before either is
    unpacked, and unpacked all or nothing (safe_extract). The archives this run downloaded are
    removed afterwards, and on any failure, as is root itself when this run made it; so a run that
    fails before unpacking leaves root as it found it, but for a .part to resume a download."""
    root = Path(root)
    try:
        found = find_cub(root)
        print(f'CUB-200-2011 found in {found[0]}: nothing to download', flush=True)
        return found
    except data.DataError:
        pass
    require_tar_filter()
    if root.exists() and not root.is_dir():
        raise data.DataError(f'--data {root}: not a folder')
    cub = root / 'CUB_200_2011'
    if not cub.is_dir() and any((root / name).exists() for name in CUB_FILES):
        cub = root                       # root is a CUB_200_2011 folder itself
    has_images = all((cub / name).exists() for name in CUB_FILES)
    if cub.exists() and not has_images:
        raise data.DataError(f'{cub} exists but lacks ' + ', '.join(
            n for n in CUB_FILES if not (cub / n).exists()) + ': move it away (or complete it) and '
            'run again; --download does not write into a CUB folder it did not make')
    missing = dict(images=not has_images,
                   segmentations=not any((p / 'segmentations').is_dir() for p in (cub, cub.parent)))
    wanted = [role for role in CUB_ARCHIVES if missing[role]]
    made_root, downloaded = not root.exists(), []
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise data.DataError(f'--data {root}: cannot make the folder ({one_line(e)})') from None
        archives = {}
        for role in wanted:
            facts = CUB_ARCHIVES[role]
            path = root / facts['file']
            if path.is_file():
                print(f'using {path} (already there)', flush=True)
            else:
                download(archive_url(facts), path)
                downloaded.append(path)
            print(f'checking {path}', flush=True)
            try:
                check_archive(path, facts, root if facts['into'] == 'root' else cub)
            except data.DataError as e:
                raise data.DataError(f'{e}; ' + ('it was removed: run the same command again to '
                                     'download it afresh' if path in downloaded else
                                     'it was there before this run and is left as it is: delete '
                                     'or replace it and run again')) from None
            archives[role] = path
        for role in sorted(archives, key=lambda r: CUB_ARCHIVES[r]['into'] != 'root'):
            dest = root if CUB_ARCHIVES[role]['into'] == 'root' else cub
            print(f'unpacking {archives[role]} into {dest}', flush=True)
            safe_extract(archives[role], dest)
    finally:
        for path in downloaded:
            path.unlink(missing_ok=True)
        if made_root:
            try:
                root.rmdir()              # only when empty: a failed run made it, or a .part is kept
            except OSError:
                pass
    found = find_cub(root)
    print(f'CUB-200-2011 is ready in {found[0]}', flush=True)
    return found


# ================================ evaluation sets ================================

class SegmentationSet(Dataset):
    """Images with ground-truth masks, prepared for the encoder; subclasses give `load(i)`
    -> (PIL RGB image, H x W bool mask, name).

    A sample: input (3 x S x S normalised), image (S x S x 3 uint8), superpixels
    (S/4 x S/4 int64, as in training), gt (H x W bool, the mask's own resolution), name.
    """

    def __init__(self, input_size, n_segments, compactness=10.0, sigma=0.0):
        self.input_size = input_size
        self.n_segments = n_segments
        self.compactness = compactness
        self.sigma = sigma

    def __getitem__(self, index):
        img, gt, name = self.load(index)
        S = self.input_size
        img = img.resize((S, S), Image.BICUBIC)
        image = np.asarray(img)
        superpixels = r2o.superpixel_map(image, self.n_segments, S // 4,
                                               self.compactness, self.sigma)
        return dict(input=data.normalize(img), image=torch.from_numpy(image.copy()),
                    superpixels=torch.from_numpy(superpixels), gt=torch.from_numpy(gt), name=name)


class BuiltinSet(SegmentationSet):
    """data.synthetic_objects: single textured shapes on textured backgrounds, 128 x 128."""

    def __init__(self, n, **kwargs):
        self.images, self.masks = data.synthetic_objects(n)
        super().__init__(**kwargs)

    def __len__(self):
        return len(self.images)

    def load(self, index):
        return Image.fromarray(self.images[index]), self.masks[index], f'builtin {index}'


class CUBSet(SegmentationSet):
    def __init__(self, items, mask_threshold=128, **kwargs):
        self.items = items
        self.mask_threshold = mask_threshold
        super().__init__(**kwargs)

    def __len__(self):
        return len(self.items)

    def load(self, index):
        image_id, image_path, mask_path = self.items[index]
        gt = load_mask(mask_path, self.mask_threshold)
        return data.load_image(image_path), gt, f'{image_id} {image_path.name}'


def collate(samples):
    batch = {k: torch.stack([s[k] for s in samples]) for k in ('input', 'image', 'superpixels')}
    batch['gt'] = [s['gt'] for s in samples]
    batch['name'] = [s['name'] for s in samples]
    batch['n_superpixels'] = [int(s['superpixels'].max()) + 1 for s in samples]   # on the host
    return batch


# ================================ encoders ================================

def infer_arch(state):
    """ResNet depth from a state_dict's keys: the block type and the number of layer3 blocks."""
    blocks = len({k.split('.')[1] for k in state if k.startswith('layer3.')})
    bottleneck = any(k.startswith('layer1.0.conv3.') for k in state)
    arch = ({6: 'resnet50', 23: 'resnet101', 36: 'resnet152'} if bottleneck
            else {2: 'resnet18', 6: 'resnet34'}).get(blocks)
    if arch is None:
        raise data.DataError(f'cannot tell the ResNet depth ({blocks} layer3 blocks, '
                             f'{"bottleneck" if bottleneck else "basic"}): give --arch')
    return arch


# The layouts load_encoder recognises from the keys, with no flag:
#   checkpoint          ours: {'model': R2O state_dict, 'args': ...}; online 'encoder.*', target
#                       'target_encoder.*'
#   authors-checkpoint  the R2O authors' training checkpoint: {'model': ..., 'optimizer', 'epoch',
#                       ...}, the ResNet an nn.Sequential of torchvision's children under
#                       '[module.]online_network.encoder.<i>.' (target: 'target_network.encoder.')
#   backbone            a torchvision ResNet state_dict (our backbone.pt, the authors' released
#                       weights), its keys maybe under 'module.', 'encoder.' or 'backbone.'
#   detectron2          a .pkl of {'model': {detectron2 name: numpy array}}, as detectron2's
#                       tools/convert-torchvision-to-d2.py writes (stem.conv1, res2..res5)
#   backbone (ViT)      a torchvision VisionTransformer state_dict (our ViT backbone.pt):
#                       class_token, conv_proj, encoder.pos_embedding, encoder.layers, encoder.ln
#   timm-vit            a ViT state_dict with timm's names, as DINO releases its ViTs
#                       (dino_deitsmall16_pretrain.pth, dino_vitbase16_pretrain.pth): cls_token,
#                       pos_embed, patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,
#                       mlp.fc1,mlp.fc2}, norm; mapped onto torchvision's (timm_vit_to_torchvision)
LAYOUTS = "ours, the authors' R2O checkpoint, torchvision ResNet or ViT, detectron2, timm/DINO ViT"
AUTHORS_KEY = re.compile(r'(?:module\.)?(online|target)_network\.encoder\.(\d+)\.(.+)')
AUTHORS_CHILDREN = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3',
                    '7': 'layer4'}              # 2 relu and 3 maxpool hold no weights
D2_KEY = re.compile(r'(?:stem|res([2-5])\.(\d+))\.(conv[1-3]|shortcut)(\.norm)?\.(\w+)')
RESNET_TOP = ('conv1.', 'bn1.', 'layer1.', 'layer2.', 'layer3.', 'layer4.')
VIT_TOP = ('class_token', 'conv_proj.', 'encoder.')
TIMM_BLOCK_KEY = re.compile(r'blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.'
                            r'(weight|bias)')
TIMM_BLOCK_NAMES = {'norm1': 'ln_1.', 'attn.qkv': 'self_attention.in_proj_',
                    'attn.proj': 'self_attention.out_proj.', 'norm2': 'ln_2.', 'mlp.fc1': 'mlp.0.',
                    'mlp.fc2': 'mlp.3.'}
TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c    # the first object of a pre-1.6 torch.save file
# How torch.load(weights_only=True) names the global it refuses to load, in the UnpicklingError
# it raises: 'Unsupported class posix.system' (torch 2.1) or '... GLOBAL posix.system ...' (later)
REFUSED_GLOBAL = re.compile(r'(?:Unsupported class|GLOBAL) ([\w.]+)')


def latin1_bytes(text, encoding='latin1'):
    """How Python 3 pickles bytes at protocol 2 (_codecs.encode); any other codec is refused."""
    if encoding not in ('latin1', 'latin-1'):
        raise data.DataError(f'the file asks for the codec {encoding!r}, not latin1, and was not '
                             'loaded')
    return text.encode('latin1')


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers (dict, list, str, numbers) and nothing else.

    A pickle can name any importable callable and have it called while loading: find_class
    is where every such name arrives, so it hands out only what numpy arrays are rebuilt with
    and refuses the rest before anything runs."""
    ARRAYS = {('numpy', 'ndarray'), ('numpy', 'dtype'),
              ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
              ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
              # protocol 5 (the default from Python 3.14) rebuilds arrays from a buffer
              ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
              ('collections', 'OrderedDict')}   # a plain container, as state_dicts are

    def find_class(self, module, name):
        if (module, name) == ('_codecs', 'encode'):
            return latin1_bytes
        if (module, name) not in self.ARRAYS:
            raise data.DataError(f'the file carries code or objects other than arrays '
                                 f'({module}.{name}) and was not loaded')
        # numpy 2 renamed numpy.core to numpy._core: read either spelling with the numpy at hand
        for spelling in (module.replace('numpy.core', 'numpy._core'),
                         module.replace('numpy._core', 'numpy.core')):
            try:
                return getattr(importlib.import_module(spelling), name)
            except (ImportError, AttributeError):
                pass
        raise data.DataError(f'this numpy has no {module}.{name}, which the file needs')


def read_weights_file(path):
    """The object in a weights file, read without running any code the file may carry.

    torch.load(weights_only=True) for torch's own files; when it cannot read the file, and the
    file is not a torch zip archive, a plain pickle (detectron2's .pkl) read by
    ArraysOnlyUnpickler. A refused file is a one-line DataError."""
    try:
        with warnings.catch_warnings():
            # a plain pickle first meets torch's reader, which warns about its protocol
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported below, in one line
        torch_error = e
    refused = (isinstance(torch_error, pickle.UnpicklingError)   # the weights-only unpickler's
               and REFUSED_GLOBAL.search(str(torch_error)))       # refusal, naming the global
    refusal = (f'{path}: the file carries code or objects other than weights ({refused[1]}) and '
               'was not loaded') if refused else None
    if zipfile.is_zipfile(path):
        raise data.DataError(refusal or f'{path}: torch.load cannot read it '
                             f'({type(torch_error).__name__}): not a ResNet checkpoint in any '
                             f'known layout ({LAYOUTS})')
    try:
        with open(path, 'rb') as f:
            obj = ArraysOnlyUnpickler(f, encoding='latin1').load()   # latin1: Python 2 pickles
    except data.DataError as e:
        raise data.DataError(f'{path}: {e}') from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a weights file"
        raise data.DataError(f'{path}: neither torch.load nor pickle can read it '
                             f'({type(e).__name__}): not a ResNet checkpoint in any known layout '
                             f'({LAYOUTS})') from None
    if isinstance(obj, int) and obj == TORCH_LEGACY_MAGIC:
        raise data.DataError(refusal or f'{path}: torch.load cannot read this old-format torch '
                             f'file ({type(torch_error).__name__})')
    return obj


def describe_object(obj, inner=True):
    """A few words on what a file holds, for error messages: its type, some keys of a dict, and
    some keys of the dict it keeps under 'model' or 'state_dict'."""
    if not isinstance(obj, dict):
        return f'{"an" if type(obj).__name__[0] in "aeiou" else "a"} {type(obj).__name__}'
    if not obj:
        return 'an empty dict'
    keys = [k if isinstance(k, str) else repr(k) for k in obj]
    shown = ', '.join(repr(k[:60])[1:-1] for k in keys[:5])
    shown += f', ... ({len(keys)} keys)' if len(keys) > 5 else ''
    wrapper = next((k for k in ('model', 'state_dict') if isinstance(obj.get(k), dict)), None)
    if inner and wrapper:                # one level only: a pickle can hold a dict inside itself
        return f'a dict with keys {shown}; its {wrapper!r} is {describe_object(obj[wrapper], False)}'
    return f'a dict with keys {shown}'


def strip_prefixes(state, prefixes):
    """Keys with any of `prefixes` removed from their start, repeatedly ('module.encoder.x' -> 'x').

    Two keys that become one (two networks in one file) are a DataError."""
    out = {}
    for key, value in state.items():
        name = key
        while name.startswith(prefixes):
            name = name[len(next(p for p in prefixes if name.startswith(p))):]
        if name in out:
            raise data.DataError(f'holds more than one network ({key!r} and another key both '
                                 f'give {name!r})')
        out[name] = value
    return out


def d2_to_torchvision(name):
    """A detectron2 ResNet name as torchvision spells it, or None for a name outside the ResNet.

    'stem.conv1.norm.weight' -> 'bn1.weight', 'res3.0.conv2.weight' -> 'layer2.0.conv2.weight',
    'res2.0.shortcut.norm.running_mean' -> 'layer1.0.downsample.1.running_mean'."""
    match = D2_KEY.fullmatch(name)
    if match is None:
        return None                      # e.g. stem.fc.* (the converter's name for fc), FPN, heads
    stage, block, conv, norm, leaf = match.groups()
    if conv == 'shortcut':
        module = 'downsample.1' if norm else 'downsample.0'
    else:
        module = ('bn' if norm else 'conv') + conv[-1]
    return (f'layer{int(stage) - 1}.{block}.' if stage else '') + f'{module}.{leaf}'


def timm_vit_to_torchvision(state):
    """A timm-style ViT state_dict (DINO's releases) under torchvision VisionTransformer's names.

    cls_token -> class_token, pos_embed -> encoder.pos_embedding, patch_embed.proj ->
    conv_proj, blocks.N.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2 ->
    encoder.layers.encoder_layer_N.ln_1 / self_attention.in_proj_ / self_attention.out_proj /
    ln_2 / mlp.0 / mlp.3, norm -> encoder.ln. The tensors are the same: timm's qkv rows are
    q, k, v with the heads in order, as nn.MultiheadAttention's in_proj. Names outside the
    encoder (head.*, a classifier's) are dropped."""
    out = {}
    for name, value in state.items():
        leaf = name.rsplit('.', 1)[-1]
        if name == 'cls_token':
            out['class_token'] = value
        elif name == 'pos_embed':
            out['encoder.pos_embedding'] = value
        elif name.startswith('patch_embed.proj.'):
            out[f'conv_proj.{leaf}'] = value
        elif name.startswith('norm.'):
            out[f'encoder.ln.{leaf}'] = value
        elif match := TIMM_BLOCK_KEY.fullmatch(name):
            block, module, leaf = match.groups()
            out[f'encoder.layers.encoder_layer_{block}.{TIMM_BLOCK_NAMES[module]}{leaf}'] = value
    return out


def build_vit(state, arch=None):
    """A torchvision VisionTransformer shaped for a ViT state_dict with torchvision's names, and
    its arch name. Patch size, width, depth, MLP width and input size (its position embedding's
    grid) come from the shapes; the number of heads from `arch` (r2o.VIT_ARCHS), else from the
    known arch of those shapes, else width / 64 (ViT-S's and ViT-B's 64 per head)."""
    hidden, _, patch, _ = state['conv_proj.weight'].shape
    depth = len({k.split('.')[2] for k in state if k.startswith('encoder.layers.')})
    shape = dict(patch_size=patch, num_layers=depth, hidden_dim=hidden,
                 mlp_dim=state['encoder.layers.encoder_layer_0.mlp.0.weight'].shape[0])
    known = arch if arch in r2o.VIT_ARCHS else next(
        (name for name, kw in r2o.VIT_ARCHS.items() if {k: kw[k] for k in shape} == shape), None)
    heads = r2o.VIT_ARCHS[known]['num_heads'] if known else max(1, hidden // 64)
    side = math.isqrt(state['encoder.pos_embedding'].shape[1] - 1)
    net = torchvision.models.VisionTransformer(side * patch, num_heads=heads, **shape)
    net.heads = nn.Identity()
    return net, known or f'vit (patch {patch}, width {hidden}, {depth} blocks, {heads} heads)'


def as_tensor(value):
    """A weight as a tensor: tensors as they are, numeric numpy arrays (detectron2) converted."""
    if isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype.kind in 'biuf':
        return torch.from_numpy(np.array(value))
    return value


def resnet_state(obj, encoder=None):
    """The torchvision ResNet state_dict inside any known layout, and the info naming the layout.

    Returns (state, info) with info's kind one of checkpoint, authors-checkpoint, backbone,
    detectron2; anything else is a DataError saying what the file holds."""
    if not isinstance(obj, dict):
        raise data.DataError(f'holds {describe_object(obj)}: not a ResNet checkpoint in any known '
                             f'layout ({LAYOUTS})')
    if isinstance(obj.get('model'), dict) and isinstance(obj.get('args'), dict):
        which = encoder or 'online'
        prefix = 'encoder.' if which == 'online' else 'target_encoder.'
        state = {k[len(prefix):]: v for k, v in obj['model'].items() if k.startswith(prefix)}
        return state, dict(kind='checkpoint', encoder=which, epoch=obj.get('epoch'),
                           trained_arch=obj['args'].get('arch'),
                           trained_image_size=obj['args'].get('image_size'))
    # training files keep the weights under 'model' (the authors', detectron2) or 'state_dict'
    weights = next((obj[k] for k in ('model', 'state_dict') if isinstance(obj.get(k), dict)), obj)
    keys = [k for k in weights if isinstance(k, str)]
    authors = [(k, AUTHORS_KEY.fullmatch(k)) for k in keys]
    if any(m for _, m in authors):
        which = encoder or 'online'
        state = {f'{AUTHORS_CHILDREN.get(m[2], m[2])}.{m[3]}': weights[k]
                 for k, m in authors if m and m[1] == which}
        if not state:
            raise data.DataError(f"holds the authors' R2O checkpoint without a {which} encoder")
        return state, dict(kind='authors-checkpoint', encoder=which, epoch=obj.get('epoch'))
    vit = strip_prefixes({k: weights[k] for k in keys}, ('module.', 'backbone.'))
    if 'class_token' in vit and 'conv_proj.weight' in vit:
        return ({k: v for k, v in vit.items() if k.startswith(VIT_TOP)},
                dict(kind='backbone', encoder=None))
    if 'cls_token' in vit and 'patch_embed.proj.weight' in vit:
        return timm_vit_to_torchvision(vit), dict(kind='timm-vit', encoder=None)
    d2 = strip_prefixes({k: weights[k] for k in keys}, ('module.', 'backbone.', 'bottom_up.'))
    if 'stem.conv1.weight' in d2:
        # the ResNet only: a detector's FPN and heads have no torchvision name
        state = {tv: as_tensor(value) for name, value in d2.items()
                 if (tv := d2_to_torchvision(name)) is not None}
        return state, dict(kind='detectron2', encoder=None)
    state = strip_prefixes({k: weights[k] for k in keys}, ('module.', 'encoder.', 'backbone.'))
    if 'conv1.weight' in state and 'layer3.0.conv1.weight' in state:
        # keys outside the ResNet (a projector saved beside it, fc) are not the encoder's
        return ({k: v for k, v in state.items() if k.startswith(RESNET_TOP)},
                dict(kind='backbone', encoder=None))
    raise data.DataError(f'holds {describe_object(obj)}: not a ResNet checkpoint in any known '
                         f'layout ({LAYOUTS})')


def load_encoder(path, arch=None, encoder=None):
    """A frozen encoder from a weights file in any layout above, recognised from its keys.

    encoder: 'online' (default) or 'target', for the files of a training run (ours, the
    authors'). Returns (torchvision ResNet in eval mode with fc = identity, or torchvision
    VisionTransformer with heads = identity for the input size of its position embedding, read
    at any other by interpolating it (r2o.vit_tokens); info dict for the results: kind names
    the layout)."""
    if not Path(path).is_file():
        raise data.DataError(f'{path}: no such file')
    obj = read_weights_file(path)
    try:
        state, info = resnet_state(obj, encoder)
    except data.DataError as e:
        raise data.DataError(f'{path}: {e}') from None
    if encoder is not None and info['encoder'] is None:
        raise data.DataError(f'{path} holds one encoder ({info["kind"]}): --encoder applies to a '
                             'training checkpoint only')
    state = {k: v for k, v in state.items() if not str(k).startswith(('fc.', 'heads.'))}
    vit = 'class_token' in state and 'encoder.layers.encoder_layer_0.mlp.0.weight' in state
    if (not all(isinstance(v, torch.Tensor) for v in state.values())
            or not (vit or 'conv1.weight' in state and 'layer3.0.conv1.weight' in state)):
        raise data.DataError(f'{path}: holds {describe_object(obj)}: {info["kind"]} layout, but '
                             'not the weights of a whole ResNet or ViT')
    arch = arch or info.get('trained_arch')
    if vit:
        net, arch = build_vit(state, arch)
    else:
        arch = arch or infer_arch(state)
        net = r2o.build_encoder(arch)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if '\n' in str(e) else str(e)
        raise data.DataError(f'{path}: the weights do not fit {arch} ({first})') from None
    info.update(path=str(path), arch=arch)
    return net.eval(), info


# ================================ clustering and foreground ================================

def lab_features(images):
    """Mean Lab colour of 4 x 4 pixel cells: B x S x S x 3 uint8 -> B x 3 x S/4 x S/4 float.

    The colour baseline's "feature map", at the superpixels' resolution."""
    lab = torch.from_numpy(rgb2lab(images.numpy()).astype(np.float32)).permute(0, 3, 1, 2)
    return F.avg_pool2d(lab, 4)


def cluster_regions(features, superpixels, k, iters=30, generator=None, normalize=True,
                    n_superpixels=None, cluster=r2o.kmeans):
    """K-means of one image's regions, by R2O's refinement (r2o.refine on a batch of one).

    features: C x h x w; superpixels: M x M ids (M a multiple of h), or None to cluster the
    h x w feature cells themselves (each cell its own region). Region features are averaged
    inside each region as in training and L2-normalised when `normalize`, then clustered by
    `cluster` (r2o.kmeans's signature: the training run's clustering, r2o.clustering).
    Returns the cluster map, int64 in [0, k): M x M (superpixels) or h x w (grid).
    """
    if superpixels is None:
        h, w = features.shape[1:]
        superpixels, n_superpixels = torch.arange(h * w, device=features.device).view(h, w), h * w
    return r2o.refine(features[None], superpixels[None], k, iters, generator,
                      n_superpixels=n_superpixels, cluster=cluster, normalize=normalize)[0]


@torch.no_grad()
def cluster_batch(net, batch, args, device, first_index):
    """The cluster maps of one loader batch, on the device: the encoder's features (the mean Lab
    colour of 4 x 4 cells without a network), then cluster_regions image by image with the
    training run's clustering (--kmeans-seeding). Image i's k-means draws come from a CPU
    generator seeded by its index alone, so its clusters depend on neither the batch, nor
    --limit, nor the device."""
    if net is None:
        features = lab_features(batch['image']).to(device)
    else:
        layer = args.layer or r2o.feature_maps(net)['cluster']      # check_layer fills it
        features = r2o.encoder_features(net, batch['input'].to(device, non_blocking=True),
                                        layer).float()
    superpixels = batch['superpixels'].to(device, non_blocking=True)
    cluster = r2o.clustering(args.kmeans_seeding)
    maps = []
    for i in range(len(features)):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + first_index + i)
        grid = args.regions == 'grid'
        maps.append(cluster_regions(features[i], None if grid else superpixels[i], args.k,
                                    args.kmeans_iters, g, normalize=net is not None,
                                    n_superpixels=batch['n_superpixels'][i], cluster=cluster))
    return maps


def to_resolution(labels, size):
    """An integer map (h x w) brought to size (H, W) by nearest neighbour (pixel centres)."""
    return F.interpolate(labels[None, None].float(), size=tuple(size),
                         mode='nearest-exact')[0, 0].long()


def majority_vote(clusters, gt):
    """Foreground by majority vote: a cluster is foreground when more than half of its pixels are
    foreground in the ground truth (the labels only name clusters; the clusters are fixed).

    clusters: H x W ints >= 0; gt: H x W bools. Returns H x W bools."""
    k = int(clusters.max()) + 1
    total = torch.bincount(clusters.flatten(), minlength=k)
    fg = torch.bincount(clusters[gt], minlength=k)
    return (2 * fg > total)[clusters]


def border_rule(clusters):
    """Label-free foreground: the clusters that touch the image border least for their size.

    Each cluster's share of the border (the one-pixel frame) is divided by its share of the
    image area (about 1 for a region placed at random); the cluster(s) with the lowest ratio
    are foreground: every cluster that does not touch the border at all, or, when all of them
    touch it, the one that touches it least for its size.
    clusters: H x W ints >= 0. Returns H x W bools."""
    k = int(clusters.max()) + 1
    area = torch.bincount(clusters.flatten(), minlength=k).float() / clusters.numel()
    frame = torch.cat([clusters[0], clusters[-1], clusters[1:-1, 0], clusters[1:-1, -1]])
    border = torch.bincount(frame, minlength=k).float() / frame.numel()
    ratio = torch.where(area > 0, border / area.clamp_min(1e-12), torch.inf)
    return (ratio == ratio.min())[clusters]


def iou_metrics(pred, gt):
    """Foreground IoU, background IoU and their mean (mIoU) of one H x W bool prediction.

    An empty union (nothing to find and nothing found) counts as IoU 1. Returns python floats."""
    def iou(a, b):
        union = (a | b).sum().item()
        return (a & b).sum().item() / union if union else 1.0
    fg, bg = iou(pred, gt), iou(~pred, ~gt)
    return dict(fg_iou=fg, bg_iou=bg, miou=(fg + bg) / 2)


# ================================ pictures ================================

def outcome_picture(pred, gt, size):
    """Prediction vs ground truth as colours: hit white, missed blue, false alarm red, rest black."""
    colours = np.array([[0, 0, 0], [40, 90, 255], [230, 40, 40], [255, 255, 255]], np.uint8)
    code = (pred.astype(np.uint8) * 2 + gt.astype(np.uint8))
    return np.asarray(Image.fromarray(colours[code]).resize((size, size), Image.NEAREST))


def save_vis(rows, path, title, size=128):
    """PNG grid, one row per image: image | ground truth | clusters | fg (majority) | fg (border)."""
    gap = np.full((size, 4, 3), 255, np.uint8)
    lines = []
    for row in rows:
        image = np.asarray(Image.fromarray(row['image']).resize((size, size), Image.BICUBIC))
        gt = np.asarray(Image.fromarray(row['gt']).resize((size, size), Image.NEAREST))
        gt = np.repeat(gt[..., None].astype(np.uint8) * 255, 3, 2)
        clusters = (0.4 * image + 0.6 * r2o.colorize(row['clusters'], size)).astype(np.uint8)
        panels = [image, gt, clusters, outcome_picture(row['majority'], row['gt'], size),
                  outcome_picture(row['label_free'], row['gt'], size)]
        line = np.concatenate([x for p in panels for x in (p, gap)][:-1], 1)
        lines += [line, np.full((4, line.shape[1], 3), 255, np.uint8)]
    grid = np.concatenate(lines)
    header = np.full((30, grid.shape[1], 3), 255, np.uint8)
    pic = Image.fromarray(np.concatenate([header, grid]))
    draw = ImageDraw.Draw(pic)
    draw.text((4, 2), title, fill=(0, 0, 0))
    draw.text((4, 15), 'image | ground truth | clusters | fg majority vote | fg label-free '
              '(white hit, blue missed, red false)', fill=(0, 0, 0))
    pic.save(path)


# ================================ main ================================

def check_layer(args, net):
    """Fill --layer (the net's cluster map, r2o.feature_maps) and check it and --input-size
    against the net: a multiple of its largest stride (32 for a ResNet, 16 for a ViT; 32 without
    a net). Returns the layer's stride (4 without a net: Lab colour of 4 x 4 cells)."""
    strides = r2o.feature_maps(net)['stride'] if net is not None else {}
    if net is not None:
        args.layer = args.layer or r2o.feature_maps(net)['cluster']
        if args.layer not in strides:
            raise data.DataError(f'--layer {args.layer}: this encoder has {", ".join(strides)}')
    largest = max(strides.values(), default=32)
    if args.input_size % largest:
        raise data.DataError(f'--input-size must be a multiple of {largest} for this encoder '
                             f'(got {args.input_size})')
    return strides.get(args.layer, 4)


def describe(args, encoder_info, data_info, stride=None):
    """The protocol as a dict: every choice that changes the numbers (stride: the clustered
    map's, check_layer)."""
    colour = args.colour_baseline
    protocol = dict(
        input_size=args.input_size,
        resize='whole image to input_size x input_size, aspect not kept, bicubic',
        features='mean Lab colour of 4x4 pixel cells' if colour else args.layer,
        feature_grid=args.input_size // (4 if colour else stride or r2o.STRIDE[args.layer]),
        regions=args.regions,
        superpixels=dict(n_segments=args.superpixels, compactness=args.slic_compactness,
                         sigma=args.slic_sigma, computed_at=args.input_size,
                         stored_at=args.input_size // 4) if args.regions == 'superpixels' else None,
        region_features=('mean inside each region' if colour else
                         'mean inside each region, L2-normalised'),
        k=args.k, kmeans=f'r2o.refine with r2o.kmeans, --kmeans-seeding {args.kmeans_seeding}, per image',
        kmeans_iters=args.kmeans_iters,
        seed=args.seed,
        to_ground_truth='cluster map resized to each mask\'s resolution, nearest',
        foreground_rules=dict(
            majority='a cluster is foreground when more than half of its pixels are ground-truth '
                     'foreground',
            label_free='the clusters with the lowest (share of the image border) / (share of '
                       'the area) are foreground: all that do not touch the border, else the one '
                       'that touches it least for its size'),
        metrics='per image, averaged over images: fg_iou; miou = (fg_iou + bg_iou) / 2',
    )
    return dict(encoder=encoder_info, data=data_info, protocol=protocol)


def build_set(args):
    common = dict(input_size=args.input_size, n_segments=args.superpixels,
                  compactness=args.slic_compactness, sigma=args.slic_sigma)
    if args.data == 'builtin':
        n = args.builtin_images if args.limit is None else min(args.limit, args.builtin_images)
        dataset = BuiltinSet(n, **common)
        return dataset, dict(set='builtin', images=n, mask_size=list(dataset.masks.shape[1:]))
    items = read_cub(args.data, args.split)
    if args.limit is not None:
        items = items[:args.limit]
    return CUBSet(items, args.mask_threshold, **common), dict(
        set='CUB-200-2011', root=str(Path(args.data).resolve()), split=args.split,
        images=len(items), mask_threshold=args.mask_threshold)


def download_command(args):
    """The command that downloads CUB into --data and runs this evaluation: this run's own command
    line with --download added (its essentials when main() was called from Python)."""
    if Path(sys.argv[0]).name == Path(__file__).name:
        argv = [sys.argv[0], *sys.argv[1:]]
    else:
        what = args.checkpoint or ('--random-init' if args.random_init else '--colour-baseline')
        argv = ['eval_cub.py', what, '--data', str(args.data)]
    return shlex.join(['python', *argv, '--download'])


def main(args):
    resolve_args(args)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))

    # ===== data on disk: a missing CUB is reported before any weights are downloaded =====
    if args.data != 'builtin' and not args.download:
        try:
            find_cub(args.data)
        except data.DataError as e:
            raise data.DataError(f'{e}; to download CUB-200-2011 there (about 1.1 GB), run: '
                                 f'{download_command(args)}') from None

    # ===== encoder =====
    if args.colour_baseline:
        net, encoder_info = None, dict(kind='colour-baseline')
    elif args.random_init:
        torch.manual_seed(args.seed)
        net = r2o.build_encoder(args.arch, args.input_size).eval()
        encoder_info = dict(kind='random-init', arch=args.arch, seed=args.seed)
    else:
        # a URL is fetched into torch's hub cache once, then read like any file
        url = args.checkpoint if is_url(args.checkpoint) else None
        net, encoder_info = load_encoder(cached_weights(url) if url else args.checkpoint,
                                         args.arch, args.encoder)
        if url:
            encoder_info['url'] = url
    stride = check_layer(args, net)
    if net is not None:
        net = net.to(device)
    if args.download:                    # after the weights: a bad address fails before 1.1 GB
        fetch_cub(args.data)

    # ===== data =====
    dataset, data_info = build_set(args)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=collate, pin_memory=device.type == 'cuda')
    results = describe(args, encoder_info, data_info, stride)
    print('encoder: ' + ', '.join(f'{k} {v}' for k, v in encoder_info.items()))
    print('data: ' + ', '.join(f'{k} {v}' for k, v in data_info.items()))
    print('protocol:\n' + '\n'.join(f'  {k}: {v}' for k, v in results['protocol'].items()),
          flush=True)
    trained = encoder_info.get('trained_image_size')
    if trained and trained != args.input_size:
        print(f'note: the encoder was trained at {trained} px, evaluated at --input-size '
              f'{args.input_size}', flush=True)

    # ===== evaluate =====
    rules = ('majority', 'label_free')
    sums = {rule: dict(fg_iou=0.0, bg_iou=0.0, miou=0.0) for rule in rules}
    vis_rows, seen, start = [], 0, time.time()
    n_batches = len(loader)
    for it, batch in enumerate(loader):
        maps = cluster_batch(net, batch, args, device, seen)
        for i, (labels, gt) in enumerate(zip(maps, batch['gt'])):
            gt = gt.to(device)
            clusters = to_resolution(labels, gt.shape)
            fg = dict(majority=majority_vote(clusters, gt),
                      label_free=border_rule(clusters))
            for rule in rules:
                for key, value in iou_metrics(fg[rule], gt).items():
                    sums[rule][key] += value
            if args.save_vis and len(vis_rows) < args.vis_count:
                vis_rows.append(dict(image=batch['image'][i].numpy(), gt=gt.cpu().numpy(),
                                     clusters=labels.cpu().numpy(),
                                     **{rule: fg[rule].cpu().numpy() for rule in rules}))
            seen += 1
        if (it + 1) % args.print_freq == 0 or it + 1 == n_batches:
            elapsed = time.time() - start
            eta = elapsed / seen * (len(dataset) - seen)
            print(f'[{seen:>{len(str(len(dataset)))}}/{len(dataset)}] '
                  + ' | '.join(f'{rule} mIoU {sums[rule]["miou"] / seen:.3f} '
                               f'fg {sums[rule]["fg_iou"] / seen:.3f}' for rule in rules)
                  + f' | {seen / elapsed:.1f} img/s, eta {r2o.fmt_time(eta)}', flush=True)
    elapsed = time.time() - start

    # ===== results =====
    metrics = {rule: {k: v / seen for k, v in sums[rule].items()} for rule in rules}
    results.update(metrics=metrics, n_images=seen, time_s=round(elapsed, 1),
                   args={k: v for k, v in sorted(vars(args).items())})
    print(f'\n{seen} images, {r2o.fmt_time(elapsed)}              fg IoU   bg IoU   mIoU')
    for rule, name in (('majority', 'majority vote (uses labels)'),
                       ('label_free', 'label-free (border rule)')):
        m = metrics[rule]
        print(f'  {name:<30} {m["fg_iou"]:7.3f}  {m["bg_iou"]:7.3f}  {m["miou"]:6.3f}')
    print('The paper\'s 71.6 (CUB, K=5) reads as mIoU under majority vote; foreground IoU '
          'separates methods better (see docs/evaluation.md).')
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + '\n')
    print(f'wrote {out}')
    if args.save_vis and vis_rows:
        folder = Path(args.save_vis)
        folder.mkdir(parents=True, exist_ok=True)
        what = encoder_info.get('path', encoder_info['kind'])
        for j in range(0, len(vis_rows), 8):
            path = folder / f'vis-{j // 8:03d}.png'
            save_vis(vis_rows[j:j + 8], path, f'{what}  K={args.k}  {args.regions}  '
                     f'{results["protocol"]["features"]}  input {args.input_size}')
        print(f'wrote {len(vis_rows)} rows of pictures to {folder}/')
    return results


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    try:
        main(args)
    except data.DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
