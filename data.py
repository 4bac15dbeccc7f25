"""Images, views, superpixels and datasets for R2O.

One training sample (see `R2ODataset.__getitem__`) is everything a step needs for one image:

    view1, view2   two augmented crops, 3 x S x S (BYOL augmentation): by default uint8 after the
                   crop and flip, with their colour augmentation's parameters in `photometric`
                   (2 x PARAMS), finished on the training device by `finish_on_device`;
                   normalised floats with photometric_on='loader'
    raw            the whole image resized to S x S (aspect not kept), no colour jitter: uint8
                   (normalised on the device), or normalised with photometric_on='loader'
    superpixels    SLIC of the whole image as an M x M integer map (M = S // 4, 56 at S = 224),
                   ids 0..n-1, each cell holding the superpixel that covers most of it
    boxes          2 x 4, the two crop boxes (x0, y0, x1, y1) normalised to the whole image
    flips          2, whether each view was flipped horizontally

Augmentation is drawn from a generator seeded by (seed, epoch, index), so a sample is the same
whichever worker, process or resumed run loads it. Superpixels never change between epochs and
are computed once per image, then read back from `SuperpixelCache`.
"""
import hashlib
import json
import math
import os
import random
import re
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm',
                    '.pgm', '.jfif'}
BICUBIC = TF.InterpolationMode.BICUBIC


class DataError(Exception):
    """Bad input data: the message is meant for the user, one line."""


# ================================ reading images ================================

# Folders of held-out images: val, valid, validation, test, testing, alone or followed by a
# non-letter (COCO's val2017, test2017, test-dev), in any case. Not valley or testudo (class names).
HELD_OUT = re.compile(r'(val|valid|validation|test|testing)([^a-z].*)?')


def find_images(root):
    """Every image file under `root` (or `root/train` when it exists), recursively, following
    symbolic links to folders and files as torchvision's ImageFolder does. Returns (files,
    skipped), both sorted: the image paths as reached from `root` (links not resolved), and the
    links that lead to no file or folder (a moved file, a class folder on an unmounted disk).

    A subset made of links (imagenet100/train/n01440764 -> /data/imagenet/train/n01440764) is
    scanned like a real copy. A folder reached a second time (a link back to a folder above it,
    or two links to one folder) is scanned once, by the first path in sorted order, so the scan
    ends and no folder's images are listed twice (a link to a single file is listed as found).
    A folder of held-out images below it (`HELD_OUT`: val, test2017, ..., real or a link) stops
    the scan with a DataError: a dataset root that holds train and val one level down (the
    authors' imagenet/images/{train,val}, COCO's coco/{train2017,val2017}) would train on both.
    One pass; a stat per folder and per link, none per plain file (os.scandir reads the entry
    types with the names). The paths are plain strings, kept as a PathList: ImageNet's 1.28
    million as Path objects cost half a minute and 460 MB per process."""
    root = str(root)
    if not os.path.isdir(root):
        raise DataError(f'--data {root}: no such folder')
    if os.path.isdir(os.path.join(root, 'train')):
        root = os.path.join(root, 'train')
    files, skipped, scanned = [], [], set()
    todo = [(root, True)]          # (path, whether a folder to scan), the next one last
    while todo:                    # depth first, each folder in name order: files come sorted
        path, is_folder = todo.pop()
        if not is_folder:
            files.append(path)
            continue
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in scanned:      # reached again through a link
                continue
            scanned.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(path))
        except OSError:                                # unreadable: passed over, as os.walk does
            continue
        found = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()                # a link: one stat of what it points to
                is_file = not is_dir and entry.is_file()
            except OSError:                            # a loop of links, no permission
                is_dir = is_file = False
            if is_dir:
                found.append((entry.name, True))
            elif not is_file:
                if entry.is_symlink():
                    skipped.append(os.path.join(path, entry.name))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((entry.name, False))
        subfolders = [name for name, is_dir in found if is_dir]
        held_out = sorted(d for d in subfolders if HELD_OUT.fullmatch(d.lower()))
        if held_out:
            train = sorted(d for d in subfolders if d.lower().startswith('train'))
            example = os.path.join(path, train[0]) if train else '.../train2017'
            raise DataError(f'--data {root} holds validation or test images ('
                            f'{", ".join(os.path.join(path, d) for d in held_out)}), and every image '
                            f'under --data is trained on: point --data at the training folder '
                            f'(e.g. --data {example})')
        found.sort(reverse=True)
        todo += [(os.path.join(path, name), is_dir) for name, is_dir in found]
    skipped.sort()
    if not files:
        raise DataError(f'--data {root}: no image files found (looked recursively for '
                        f'{", ".join(sorted(IMAGE_EXTENSIONS))})'
                        + (f'; {skipped_line(skipped)}' if skipped else ''))
    return PathList(files), skipped


class PathList:
    """A long list of file paths as one buffer of their bytes and an array of offsets: no Python
    object per path, so ImageNet's 1.28 million paths take tens of MB, pickle to loader workers
    and to other processes in one piece, and are not copied page by page into forked workers (as
    the reference counts of a million objects make them be). Items are str (os.fsdecode)."""

    def __init__(self, paths):
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.buffer = np.frombuffer(b''.join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = index + len(self) if index < 0 else index
        if not 0 <= index < len(self):
            raise IndexError(f'path {index} of {len(self)}')
        return os.fsdecode(self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes())

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def skipped_line(skipped):
    """One line on the links `find_images` skipped: how many, and the first with its target."""
    first = skipped[0]
    try:
        target = f' -> {os.readlink(first)}'
    except OSError:
        target = ''
    return (f'skipped {len(skipped)} link{"s" if len(skipped) > 1 else ""} under --data that '
            f'lead{"" if len(skipped) > 1 else "s"} to no file or folder (moved, or on a disk '
            f'not mounted?), e.g. {first}{target}')


def to_rgb(img):
    """Any Pillow image as 8-bit RGB: grayscale, palette, alpha (on white), CMYK, 16-bit, float."""
    if img.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F'):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = a.min(), a.max()
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), 'L')
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert('RGB')


def load_image(path):
    """Decode one file fully (truncated files raise here, not later) and return RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


# ================================ generated scenes ================================

SHAPES = ('ellipse', 'rectangle', 'triangle', 'pentagon', 'star')


def _smooth_noise(rng, size, cells):
    """Low-frequency noise in [0, 1]: a random cells x cells grid, bicubically upsampled."""
    grid = rng.random((1, 1, cells, cells), dtype=np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(size, size),
                                         mode='bicubic', align_corners=False)
    return up[0, 0].clamp(0, 1).numpy()


def _texture(rng, size, yy, xx):
    """A random colour texture, H x W x 3 in [0, 1]: solid, stripes, checks, dots or noise."""
    c1 = rng.random(3, dtype=np.float32)
    c2 = np.clip(c1 + rng.uniform(-0.5, 0.5, 3).astype(np.float32), 0, 1)
    kind = rng.integers(5)
    freq = rng.uniform(6, 16)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == 0:
        t = np.zeros_like(xx)
    elif kind == 1:
        t = (np.sin(u * freq * 2 * math.pi) > 0).astype(np.float32)
    elif kind == 2:
        t = ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
    elif kind == 3:
        t = ((np.sin(u * freq * 2 * math.pi) * np.sin(v * freq * 2 * math.pi)) > 0.5).astype(np.float32)
    else:
        t = _smooth_noise(rng, size, int(rng.integers(4, 12)))
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return img + rng.normal(0, 0.03, img.shape).astype(np.float32)


def _shape_mask(shape, xx, yy, cx, cy, radius, angle, aspect):
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    if shape == 'ellipse':
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1
    if shape == 'rectangle':
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    if shape == 'star':
        return r <= radius * (0.6 + 0.4 * np.cos(5 * theta))
    sides = 3 if shape == 'triangle' else 5
    sector = 2 * math.pi / sides
    edge = radius * math.cos(math.pi / sides) / np.cos(np.mod(theta, sector) - sector / 2)
    return r <= edge


def synthetic_scene(index, size=128, seed=0, objects=(1, 4), radius=(0.12, 0.3)):
    """A deterministic generated scene: textured background plus `objects` textured shapes.

    Returns (image uint8 H x W x 3, instances int64 H x W with 0 = background, 1.. = objects,
    later objects painted over earlier ones). The same (index, seed) always gives the same scene.
    """
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = _texture(rng, size, yy, xx) * 0.7 + _smooth_noise(rng, size, 3)[..., None] * 0.3
    instances = np.zeros((size, size), np.int64)
    for k in range(int(rng.integers(objects[0], objects[1] + 1))):
        r = rng.uniform(*radius)
        cx, cy = rng.uniform(r * 0.6, 1 - r * 0.6, 2)
        inside = _shape_mask(SHAPES[rng.integers(len(SHAPES))], xx, yy, cx, cy, r,
                             rng.uniform(0, math.pi), rng.uniform(0.6, 1.0))
        img[inside] = _texture(rng, size, yy, xx)[inside]
        instances[inside] = k + 1
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), instances


def synthetic_objects(n, size=128, seed=1):
    """The built-in evaluation set: `n` single-object scenes with ground-truth masks.

    A different seed stream from the training scenes. Returns (images n x H x W x 3 uint8,
    masks n x H x W bool).
    """
    pairs = [synthetic_scene(10_000_000 + i, size, seed, objects=(1, 1), radius=(0.22, 0.36))
             for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] > 0 for p in pairs])


# ================================ superpixels ================================

class SuperpixelCache:
    """Superpixels computed once per image, kept in one memory-mapped file per dataset.

    Row i holds image i's M x M map (uint16) and a CRC32 of (i, map). The CRC is written after
    the map, so a row written halfway (a killed worker, a crash) never reads back as valid and
    is simply computed again. Rows are written by whichever loader worker or process first
    needs them; concurrent writers of the same row write the same bytes. The file is created
    atomically (hard link of a finished temporary file), so racing processes share one file.
    """

    def __init__(self, folder, key, n_images, size):
        self.path = Path(folder) / f'superpixels-{key}.npy'
        self.shape = (n_images, size * size + 2)
        self.size = size
        self._rows = None
        self._pid = None

    def _open(self):
        if self._rows is None or self._pid != os.getpid():   # each worker process maps its own
            if not self.path.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f'.{os.getpid()}.{random.getrandbits(32)}.tmp')
                rows = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint16, shape=self.shape)
                rows.flush()
                del rows
                try:
                    os.link(tmp, self.path)                # fails if another process won the race
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink()
            self._rows = np.load(self.path, mmap_mode='r+')
            if self._rows.shape != self.shape:
                raise DataError(f'superpixel cache {self.path} has shape {self._rows.shape}, '
                                f'expected {self.shape}: delete it')
            self._pid = os.getpid()
        return self._rows

    def filled(self, indices):
        """How many of these rows hold a valid map (CRC checked), without creating the file."""
        if self._rows is None and not self.path.exists():
            return 0
        return sum(self.get(int(i)) is not None for i in indices)

    def _crc(self, index, labels):
        return zlib.crc32(labels.tobytes(), zlib.crc32(index.to_bytes(8, 'little')))

    def get(self, index):
        row = self._open()[index]
        labels = np.array(row[:-2])
        stored = int(row[-2]) << 16 | int(row[-1])
        if stored != self._crc(index, labels):
            return None
        return labels.reshape(self.size, self.size).astype(np.int64)

    def put(self, index, labels):
        labels = labels.astype(np.uint16).ravel()
        rows = self._open()
        rows[index, :-2] = labels
        crc = self._crc(index, labels)
        rows[index, -2:] = (crc >> 16, crc & 0xFFFF)


# ================================ views ================================

def random_crop_box(rng, width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A RandomResizedCrop box (left, top, w, h) in pixels, drawn from `rng` (random.Random)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # fallback: the central crop with the ratio clamped (as torchvision does)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# The reference blurs with OpenCV, cv2.GaussianBlur(img, (23, 23), sigma). `gaussian_blur` computes
# the same Gaussian in torch, one axis at a time; Pillow's GaussianBlur (`--blur pillow`) is an
# approximation made of box filters.

def reflect_101(n, start, stop):
    """Positions start..stop-1 along an axis of length n, mapped into 0..n-1 by mirroring at the
    ends without repeating the edge pixel (dcb|abcd|cba: OpenCV's BORDER_REFLECT_101, torch's
    'reflect' padding). An axis shorter than the reach is mirrored again, as OpenCV does."""
    i = torch.arange(start, stop)
    if n == 1:
        return torch.zeros_like(i)
    i = i.remainder(2 * (n - 1))                   # the mirrored axis repeats every 2(n - 1)
    return torch.where(i < n, i, 2 * (n - 1) - i)


def blur_first_dim(x, kernel, block=16):
    """Convolve x (n x ..., float32) along its first dimension with an odd-length 1-D kernel,
    border reflect-101. Same shape out.

    As a matrix product, out = A @ x with A an n x n band matrix (row i holds the kernel around
    column i). The band is thin, so the product is taken a block of `block` output rows at a
    time: each block needs only the block + taps - 1 input rows around it, and every block uses
    the same block x (block + taps - 1) slice of the band."""
    n, taps = x.shape[0], len(kernel)
    r = taps // 2
    blocks = -(-n // block)
    band = torch.zeros(block, block + taps - 1, dtype=x.dtype)     # band[i, i + t] = kernel[t]
    band.scatter_(1, torch.arange(block)[:, None] + torch.arange(taps),
                  kernel.to(x.dtype).expand(block, -1))
    rows = x.index_select(0, reflect_101(n, -r, blocks * block + r)).flatten(1)  # padded, 2-D
    windows = rows.unfold(0, block + taps - 1, block).transpose(1, 2)   # blocks x rows seen x rest
    return (band @ windows).reshape(blocks * block, *x.shape[1:])[:n]


def gaussian_blur(img, sigma, taps=23):
    """The reference's blur of a PIL image: cv2.GaussianBlur(img, (taps, taps), sigma).

    The 1-D kernel exp(-(i - taps // 2)^2 / (2 sigma^2)), i = 0..taps-1, normalised to sum 1,
    is applied down the columns, then along the rows (the taps x taps Gaussian is the product of
    the two), the border reflected without repeating the edge pixel, the result rounded to 8
    bits. This equals the 2-D convolution `torchvision.transforms.functional.gaussian_blur(img,
    taps, sigma)` (the same kernel and border) within one grey level, nearly always exactly, and
    is 6-12x faster: on one CPU thread a 224 x 224 RGB view takes about as long as with Pillow's
    box-filter approximation (`python bench.py --parts blur` times all three). Any image size,
    also one smaller than the kernel's reach (the border is mirrored again, as OpenCV does); 8-bit
    images with any number of channels (L, RGB, RGBA)."""
    if taps % 2 == 0:
        raise ValueError(f'taps must be odd (got {taps})')
    a = np.asarray(img)
    x = torch.from_numpy(a.astype(np.float32)).view(a.shape[0], a.shape[1], -1)   # H x W x C
    i = torch.arange(taps, dtype=torch.float64) - taps // 2
    kernel = torch.exp(-i * i / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).float()
    x = blur_first_dim(x, kernel)                                              # down the columns
    x = blur_first_dim(x.transpose(0, 1), kernel).transpose(0, 1)              # along the rows
    out = x.round().clamp_(0, 255).to(torch.int16).to(torch.uint8)   # via int16: a faster cast
    return Image.fromarray(out.contiguous().view(a.shape).numpy())


def color_augment(img, rng, blur_p, solarize_p, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                  gray_p=0.2, blur='gaussian'):
    """BYOL colour augmentation of a PIL image with parameters drawn from `rng`.

    blur: 'gaussian', the reference's 23-tap Gaussian (`gaussian_blur`), or 'pillow', Pillow's
    box-filter approximation of it."""
    if rng.random() < jitter_p:
        b, c, s, h = jitter
        ops = [lambda x: TF.adjust_brightness(x, rng.uniform(1 - b, 1 + b)),
               lambda x: TF.adjust_contrast(x, rng.uniform(1 - c, 1 + c)),
               lambda x: TF.adjust_saturation(x, rng.uniform(1 - s, 1 + s)),
               lambda x: TF.adjust_hue(x, rng.uniform(-h, h))]
        rng.shuffle(ops)
        for op in ops:
            img = op(img)
    if rng.random() < gray_p:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if rng.random() < blur_p:
        sigma = rng.uniform(0.1, 2.0)
        if blur == 'gaussian':
            img = gaussian_blur(img, sigma)
        elif blur == 'pillow':
            img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
        else:
            raise ValueError(f'blur {blur!r}: expected gaussian or pillow')
    if rng.random() < solarize_p:
        img = TF.solarize(img, 128)
    return img


def normalize(img):
    """A PIL image or 3 x H x W uint8 tensor as an ImageNet-normalised float tensor."""
    x = img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img)
    return TF.normalize(x.float().div(255), IMAGENET_MEAN, IMAGENET_STD)


def denormalize(x):
    """Normalised 3 x H x W tensor back to an H x W x 3 uint8 array (for pictures)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


RESAMPLE = ('torch', 'pillow')


def pixels_of(img, resample):
    """What `resized_crop` resamples: a PIL image's 3 x H x W uint8 tensor (resample 'torch')
    or the image itself ('pillow')."""
    return TF.pil_to_tensor(img) if resample == 'torch' else img


def width_height(img):
    """(width, height) of a PIL image or a 3 x H x W tensor."""
    return img.size if isinstance(img, Image.Image) else (img.shape[2], img.shape[1])


def resized_crop(pixels, box, size):
    """The box (left, top, w, h) of an image resized to size x size: 3 x size x size uint8,
    bicubic and antialiased. A 3 x H x W uint8 tensor goes through torch's uint8 kernel, which
    follows Pillow's two passes to 2 grey levels (about 0.5% of the values differ) at 3.5 times
    Pillow's speed on one core (bench.py --parts resample); a PIL image goes through Pillow, as
    torchvision's RandomResizedCrop and the reference do."""
    left, top, w, h = box
    if isinstance(pixels, Image.Image):
        return TF.pil_to_tensor(TF.resized_crop(pixels, top, left, h, w, [size, size], BICUBIC,
                                                antialias=True))
    crop = pixels[None, :, top:top + h, left:left + w]
    return F.interpolate(crop, (size, size), mode='bicubic', antialias=True)[0].contiguous()


def two_views(img, size, rng, flip_p=0.5, scale=(0.08, 1.0), blur='gaussian', on_device=False):
    """Two augmented views of an image, their boxes (normalised x0, y0, x1, y1) and flips.

    img: a PIL image, resampled by Pillow, or its 3 x H x W uint8 tensor (`pixels_of`),
    resampled by torch (see `resized_crop`). View 1 is always blurred and never solarised;
    view 2 is blurred with p=0.1 and solarised with p=0.2 (BYOL's asymmetric pair).

    on_device: the views stop after the crop and flip, as 3 x S x S uint8, and their colour
    augmentation comes back as parameters (2 x PARAMS, drawn from rng exactly as color_augment
    draws them) for `photometric` to apply on the training device; the views are then (views,
    boxes, flips, params). Otherwise the views are finished here (colour augmentation by
    color_augment, normalised) and params is None.
    """
    views, boxes, flips, params = [], [], [], []
    width, height = width_height(img)
    for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2)):
        left, top, w, h = random_crop_box(rng, width, height, scale)
        view = resized_crop(img, (left, top, w, h), size)
        flip = rng.random() < flip_p
        if flip:
            view = view.flip(-1)
        if on_device:
            views.append(view)
            params.append(draw_photometric(rng, blur_p, solarize_p))
        else:
            view = Image.fromarray(view.permute(1, 2, 0).numpy())
            views.append(normalize(color_augment(view, rng, blur_p, solarize_p, blur=blur)))
        boxes.append((left / width, top / height, (left + w) / width, (top + h) / height))
        flips.append(flip)
    return (views, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips),
            torch.stack(params) if on_device else None)


# ---- the colour augmentation on the training device ----
#
# The loader ships each view as uint8 after its crop and flip, with the parameters of its colour
# augmentation; `photometric` applies them to a whole batch on the training device (one path on a
# CPU and a GPU). The parameters are drawn from the sample's generator in color_augment's order,
# so they are the ones the per-image path would use, and a resumed run draws the same.

# one row per view: jitter on, brightness, contrast, saturation, hue, the jitter's order (4 op
# indices: 0 brightness, 1 contrast, 2 saturation, 3 hue), grey on, blur on, sigma, solarize on
PARAMS = 13


def draw_photometric(rng, blur_p, solarize_p, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                     gray_p=0.2):
    """color_augment's random draws, in its order, as a PARAMS-vector (see photometric)."""
    p = torch.zeros(PARAMS)
    p[1:4] = 1.0                                     # identity factors when the jitter is off
    p[5:9] = torch.arange(4.0)
    if rng.random() < jitter_p:
        b, c, s, h = jitter
        ranges = [(1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)]
        order = [0, 1, 2, 3]
        rng.shuffle(order)                           # consumes what shuffling four ops consumes
        p[0] = 1.0
        for op in order:
            p[1 + op] = rng.uniform(*ranges[op])
        p[5:9] = torch.tensor(order, dtype=torch.float32)
    p[9] = float(rng.random() < gray_p)
    if rng.random() < blur_p:
        p[10], p[11] = 1.0, rng.uniform(0.1, 2.0)
    p[12] = float(rng.random() < solarize_p)
    return p


def grey(x):
    """ITU-R 601 luma of B x 3 x H x W RGB, B x 1 x H x W (torchvision's and Pillow's weights)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def shift_hue(x, hue):
    """Rotate the hue of B x 3 x H x W RGB in [0, 1] by hue (B, in turns) through HSV."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h = torch.where(maxc == r, ((g - b) / safe) % 6,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = torch.where(chroma > 0, h, torch.zeros_like(h))
    h = (h + hue[:, None, None]) % 1.0
    s = torch.where(maxc > 0, chroma / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    v = maxc
    k = (torch.stack([5.0 + 6 * h, 3.0 + 6 * h, 1.0 + 6 * h], 1)) % 6     # HSV -> RGB
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def blur_batch(x, sigma, taps=23):
    """gaussian_blur on a batch, each image with its own sigma (B): the taps-long Gaussian one
    axis at a time, the border reflected without repeating the edge (OpenCV's, the reference's).
    Images larger than taps // 2 on each side."""
    B, C, H, W = x.shape
    i = torch.arange(taps, device=x.device, dtype=torch.float32) - taps // 2
    kernel = torch.exp(-i * i / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)   # B*C x taps
    r = taps // 2
    y = F.pad(x.reshape(1, B * C, H, W), (0, 0, r, r), mode='reflect')
    y = F.conv2d(y, kernel[:, None, :, None], groups=B * C)                  # down the columns
    y = F.pad(y, (r, r, 0, 0), mode='reflect')
    y = F.conv2d(y, kernel[:, None, None, :], groups=B * C)                  # along the rows
    return y.reshape(B, C, H, W)


def photometric(views, params):
    """BYOL's colour augmentation of a batch of views on their device, then the normalisation:
    views B x 3 x S x S uint8 (after crop and flip), params B x PARAMS (draw_photometric) ->
    normalised float B x 3 x S x S.

    torchvision's semantics, as color_augment: with the jitter on, brightness, contrast,
    saturation and hue in the image's own random order, then grey, Gaussian blur and solarise.
    The per-image path rounds to 8 bits after every operation; this one stays in float, so the
    values differ by about a grey level (a test states the bound)."""
    x = views.float() / 255
    on = params[:, 0].bool()[:, None, None, None]
    b, c, s, h = (params[:, i][:, None, None, None] for i in range(1, 5))
    order = params[:, 5:9][:, :, None, None, None]                 # B x 4 positions
    hue_at = (order == 3).float().argmax(1)                         # each image's hue position
    # brightness, contrast and saturation each blend the image with a base: black, the mean
    # grey level, the grey image. Those before the hue, then the hue (one HSV pass for all),
    # then those after it, each image in its own order.
    for after_hue in (False, True):
        if after_hue:
            x = torch.where(on, shift_hue(x, h[:, 0, 0, 0]), x)
        for position in range(4):
            op, g = order[:, position], grey(x)
            factor = torch.where(op == 0, b, torch.where(op == 1, c, s))
            base = torch.where(op == 0, torch.zeros_like(g),
                               torch.where(op == 1, g.mean((1, 2, 3), keepdim=True), g))
            turn = (position > hue_at) if after_hue else (position < hue_at)
            x = torch.where(on & turn & (op != 3), (x * factor + base * (1 - factor)).clamp(0, 1), x)
    x = torch.where(params[:, 9].bool()[:, None, None, None], grey(x).expand_as(x), x)
    blur = params[:, 10].bool()[:, None, None, None]
    x = torch.where(blur, blur_batch(x, params[:, 11].clamp_min(0.1)), x)
    x = torch.where(params[:, 12].bool()[:, None, None, None] & (x >= 128 / 255), 1 - x, x)
    return normalize_batch(x)


def finish_on_device(batch):
    """A batch from a dataset with photometric_on='device', already on its device: the views'
    colour augmentation and normalisation (photometric) and the raw view's normalisation.
    A batch finished in the loader passes unchanged."""
    params = batch.pop('photometric', None)
    if params is not None:
        batch['view1'] = photometric(batch['view1'], params[:, 0])
        batch['view2'] = photometric(batch['view2'], params[:, 1])
        batch['raw'] = normalize_batch(batch['raw'])
    return batch


def normalize_batch(x):
    """Float B x 3 x H x W in [0, 1] (or uint8) -> ImageNet mean/std normalised."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    # channel by channel with Python numbers: no constant tensor to copy to the device
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(IMAGENET_MEAN,
                                                                         IMAGENET_STD))], 1)


# ================================ datasets ================================

class R2ODataset(Dataset):
    """Base dataset: subclasses say how to load image `index` as PIL RGB and name themselves.

    Indexed by (epoch, index) pairs (see `EpochSampler`) so that augmentation depends on the
    epoch without any state in the (possibly persistent) loader workers.
    """
    skipped = ()     # entries left out as not images (ImageFolderDataset: links to nothing)

    def __init__(self, superpixel_map, image_size=224, n_segments=100, slic_compactness=10.0,
                 slic_sigma=0.0, slic_input='rgb', flip_p=0.5, cache_dir=None, seed=0,
                 crop_scale=(0.08, 1.0), blur='gaussian', photometric_on='device',
                 resample='torch'):
        self.superpixel_map = superpixel_map       # R2O's prior: r2o.superpixel_map
        self.image_size = image_size
        self.mask_size = image_size // 4
        self.n_segments = n_segments
        self.slic_compactness = slic_compactness
        self.slic_sigma = slic_sigma
        self.slic_input = slic_input
        self.flip_p = flip_p
        self.crop_scale = tuple(crop_scale)
        self.blur = blur
        if photometric_on not in ('device', 'loader'):
            raise ValueError(f'photometric_on {photometric_on!r}: expected device or loader')
        if photometric_on == 'device' and blur != 'gaussian':
            raise DataError(f'--blur {blur} is Pillow\'s, applied in the loader: add '
                            '--photometric-on loader')
        self.on_device = photometric_on == 'device'
        if resample not in RESAMPLE:
            raise ValueError(f'resample {resample!r}: expected one of {RESAMPLE}')
        self.resample = resample          # the views' and raw view's resizing: see resized_crop
        self.seed = seed
        self.cache = None
        if cache_dir is not None:
            self.cache = SuperpixelCache(cache_dir, self.cache_key(), len(self), self.mask_size)

    def load(self, index):
        raise NotImplementedError

    def identity(self):
        """Strings that identify the images (file names, generator settings) for the cache key."""
        raise NotImplementedError

    def cache_key(self):
        params = dict(n_segments=self.n_segments, slic_size=self.image_size,   # SLIC's input size
                      compactness=self.slic_compactness, sigma=self.slic_sigma,
                      input=self.slic_input,
                      mask_size=self.mask_size, version=1)
        h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
        for s in self.identity():
            h.update(s.encode() + b'\n')
        return h.hexdigest()[:16]

    def superpixels(self, index, image=None):
        """Image `index`'s superpixels, mask_size x mask_size int64, from the cache if there.

        SLIC runs on the whole RGB image resized to the training size (aspect not kept, like
        the raw view), on its RGB values (slic_input 'rgb') or, as the reference code, on the
        normalised tensor ('normalized')."""
        labels = self.cache.get(index) if self.cache is not None else None
        if labels is None:
            labels = self.compute_superpixels(self.load(index) if image is None else image)
            if self.cache is not None:
                self.cache.put(index, labels)
        return labels

    def compute_superpixels(self, image):
        """A PIL image's superpixels by the dataset's prior and settings, not cached."""
        image = np.asarray(image.resize((self.image_size, self.image_size), Image.BICUBIC))
        if self.slic_input == 'normalized':          # what the reference code feeds SLIC
            image = (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return self.superpixel_map(image, self.n_segments, self.mask_size,
                                   self.slic_compactness, self.slic_sigma)

    def load_checked(self, index):
        """Load image `index`; if it is unreadable, take the next readable one and report it."""
        bad = []
        for offset in range(min(len(self), 50)):
            i = (index + offset) % len(self)
            try:
                return i, self.load(i), bad
            except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
                bad.append(f'{self.name(i)} ({type(e).__name__}: {e})')
        raise DataError(f'{len(bad)} unreadable images in a row, e.g. {bad[0]}')

    def name(self, index):
        return str(index)

    def __getitem__(self, item):
        epoch, index = item
        index, img, bad = self.load_checked(index)
        rng = random.Random(f'{self.seed}-{epoch}-{index}')
        pixels = pixels_of(img, self.resample)
        views, boxes, flips, params = two_views(pixels, self.image_size, rng, self.flip_p,
                                                self.crop_scale, self.blur, self.on_device)
        raw = resized_crop(pixels, (0, 0) + img.size, self.image_size)
        if not self.on_device:
            raw = normalize(raw)
        superpixels = self.superpixels(index, img)
        sample = dict(view1=views[0], view2=views[1], raw=raw,
                      superpixels=torch.from_numpy(superpixels), boxes=boxes, flips=flips,
                      index=index, bad=bad)
        if self.on_device:      # uint8 views and raw view; `finish_on_device` completes them
            sample['photometric'] = params
        return sample


class ImageFolderDataset(R2ODataset):
    """Every image under a folder (ImageNet's train/ class folders, COCO's flat folder, ...)."""

    def __init__(self, root, listing=None, **kwargs):
        """listing: find_images(root)'s (files, skipped) when another process has scanned it."""
        self.root = str(root)
        self.files, self.skipped = listing if listing is not None else find_images(root)
        super().__init__(**kwargs)

    def __len__(self):
        return len(self.files)

    def load(self, index):
        return load_image(self.files[index])

    def name(self, index):
        return str(self.files[index])

    def identity(self):
        # paths as reached from the root, links not resolved: the key follows what --data shows
        prefix = os.path.join(self.root, '')          # every path was joined onto the root
        return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, self.root)
                for p in self.files]


class SyntheticDataset(R2ODataset):
    """Generated scenes (`synthetic_scene`), made in memory on demand: no files, deterministic."""

    def __init__(self, n_images=1024, scene_size=128, scene_seed=0, **kwargs):
        self.n_images = n_images
        self.scene_size = scene_size
        self.scene_seed = scene_seed
        super().__init__(**kwargs)

    def __len__(self):
        return self.n_images

    def load(self, index):
        return Image.fromarray(synthetic_scene(index, self.scene_size, self.scene_seed)[0])

    def name(self, index):
        return f'synthetic scene {index}'

    def identity(self):
        return [f'synthetic n={self.n_images} size={self.scene_size} seed={self.scene_seed}']


class SuperpixelsOnly(Dataset):
    """A dataset's superpixels alone, item i -> 1 if they were computed now, 0 if they were in the
    cache, -1 if the image is unreadable: a loader over it fills the cache with every worker
    (r2o.py --prebuild-superpixels)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if self.dataset.cache.get(index) is not None:
            return 0
        try:
            self.dataset.superpixels(index)
        except Exception:  # noqa: BLE001 - an unreadable image: training reports it
            return -1
        return 1


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs: a shuffled, rank-sharded order (DistributedSampler's),
    tagged with the epoch so the dataset can seed augmentation from it."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


def collate(samples):
    """Stack the tensors of a list of samples; gather the names of unreadable images."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in
             ('view1', 'view2', 'raw', 'superpixels', 'boxes', 'flips')}
    if 'photometric' in samples[0]:
        batch['photometric'] = torch.stack([s['photometric'] for s in samples])
    batch['index'] = torch.tensor([s['index'] for s in samples])
    # counted here, on the host: on a GPU, reading the max would make the step wait
    batch['n_superpixels'] = int(batch['superpixels'].max()) + 1
    batch['bad'] = [b for s in samples for b in s['bad']]
    return batch
