"""The image cache: every split's images decoded, resized and cropped once into uint8 pixels at the
model's resolution, by forked worker processes (large JPEGs drafted), and kept on disk for the next run.

An entry is a folder named by what decides its pixels (cache_key): pixels.u8, memory-mapped, and
index.json (rows, captions, crc32 of each chunk of pixels, and of itself). It is built under a
temporary name and renamed into place; a flock on the cache folder lets one process build at a time;
a damaged entry is named and rebuilt, and a dead process's unfinished fill is removed.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import mmap
import multiprocessing
import os
import re
import shutil
import socket
import sys
import zlib

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from captioning import cli, decode, sources, workers
from captioning.batches import to_pixels
from captioning.errors import DataError
from captioning.sources import check_columns



# Bump when what prepare_split stores changes (2: the draft in the key, checksums in index.json; 3: index.json
# checksums itself, the pixel limit in the key).
CACHE_VERSION = 3


# A pixel file is checked against its checksums at every opening when it is at most this big: crc32 ran at
# 6.7 GB/s over bytes in memory here, and check_segments at 5.7 GB/s reading pixels.u8 from the page cache
# (0.2 s a GiB; from disk, the disk's speed). A bigger file, which may not fit in memory, has SAMPLED_SEGMENTS of
# its chunks checked, spread over it; its size is always checked, and verify=True checks everything.
FULL_CHECK_BYTES = 1 << 30


SAMPLED_SEGMENTS = 16


_filling = set()  # the .tmp-PID folders this process is writing now


class CacheDamaged(OSError):
    """A cache entry that is incomplete or does not match its checksums; the message says how."""


def cache_key(table, image_column, text_column, image_processor, draft=None, max_pixels=cli.MAX_IMAGE_PIXELS):
    """Names the preprocessed form of a split: the table's datasets fingerprint (content, files and
    their modification times, split arguments), everything that shapes the pixels, and the pixel
    limit, which decides the rows left out."""
    settings = {k: v for k, v in image_processor.to_dict().items() if not k.startswith("_")}
    ident = json.dumps([CACHE_VERSION, table._fingerprint, image_column, text_column, settings, draft, max_pixels],
                       sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def prepare_split(table, image_column, text_column, what, image_processor, skipped=None, cache_dir=None, chunk=64,
                  draft=None, num_workers=0, verify=None, notify=None, max_pixels=cli.MAX_IMAGE_PIXELS):
    """Decode, resize and crop every image once -> (uint8 pixels (N, 3, H, W), captions).

    Bad rows raise (the first, naming it) or are described in `skipped`, as in read_rows. With
    cache_dir the pixels are written there (a raw file with its size and checksums in index.json,
    opened memory-mapped: a split larger than memory is fine) and the next run with the same data
    and processor starts from them without decoding.

    draft: the shortest edge to decode JPEGs at least at (decode.draft_size(image_processor)): a
      large JPEG is decoded at 1/2, 1/4 or 1/8 size, then resized and cropped by the processor as
      usual. None decodes every pixel: the processor's own output exactly.
    max_pixels: an image that would decode to more pixels is a bad row (decode.open_image).
    num_workers: processes that decode `chunk` rows at a time and write their pixels in place
      (0 or 1: this process). Row order, captions and skipped rows do not depend on it.
    verify: check the cached pixels against their checksums: True always, False never (the size
      is always checked), None when cheap (FULL_CHECK_BYTES). A damaged entry is rebuilt.
    notify: gets one line for each thing worth telling (a damaged entry rebuilt, a dead fill's
      leftover removed, waiting for another process); default: printed on stderr."""
    check_columns(table, image_column, text_column, what)
    notify = notify or _print_line
    job = Fill(image_processor, image_column, text_column, what, draft, skipped is None, row_shape(image_processor),
               max_pixels=max_pixels)
    if not cache_dir:
        job.slots = MemorySlots(len(table) * job.row_bytes)
        kept, captions, bad, _ = fill(table, job, chunk, num_workers)
        report_bad(bad, skipped)
        return job.slots.array(kept, job.shape), captions
    os.makedirs(cache_dir, exist_ok=True)
    remove_leftovers(cache_dir, notify)
    key = cache_key(table, image_column, text_column, image_processor, draft, max_pixels)
    folder = os.path.join(cache_dir, f"{what}-{key}")
    try:
        entry = open_entry(folder, verify)
    except CacheDamaged:
        entry = None  # judged again under the lock: another process may be rebuilding it
    if entry is None:
        with cache_lock(cache_dir, notify):
            entry = open_or_build(folder, table, job, chunk, num_workers, verify, notify)
    pixels, index = entry
    report_bad(index["skipped"], skipped)
    return pixels, index["captions"]


def _print_line(line):
    print(line, file=sys.stderr, flush=True)


def report_bad(bad, skipped):
    if bad and skipped is None:
        raise DataError(bad[0])
    if skipped is not None:
        skipped.extend(bad)


def row_shape(image_processor):
    """(3, H, W) of every image the processor makes (it resizes and crops to one size)."""
    return tuple(int(n) for n in to_pixels(image_processor, [Image.new("RGB", (320, 240))]).shape[1:])


@dataclasses.dataclass
class Fill:
    """What decoding a chunk of rows needs, in this process or in a worker."""
    image_processor: object
    image_column: str
    text_column: str
    what: str
    draft: int = None
    stop_at_bad: bool = True  # no `skipped` list: the first bad row ends the fill
    shape: tuple = (3, 1, 1)
    slots: object = None
    max_pixels: int = cli.MAX_IMAGE_PIXELS

    @property
    def row_bytes(self):
        return int(np.prod(self.shape))


def fill(table, job, chunk, num_workers):
    """Decode every row into job.slots -> (rows kept, their captions, bad rows' messages, [rows, crc32] per chunk).

    A chunk starting at row s writes its k good rows to slots s .. s+k-1, so workers never wait
    for each other; taking the chunks in order, the parent then moves each chunk's rows down over
    the slots of the bad rows before it, into slots that finished chunks have already left. At most
    two chunks per worker are in flight."""
    rows = sources.undecoded(table, job.image_column)
    chunks = ((k * chunk, list(zip(itertools.count(k * chunk), batch[job.image_column], batch[job.text_column])))
              for k, batch in enumerate(rows.iter(batch_size=chunk)))
    processes = min(num_workers, -(-len(table) // chunk)) if "fork" in multiprocessing.get_all_start_methods() else 0
    # fork, not spawn or forkserver: a new interpreter took 2.9 s here to import what unpickling an image processor
    # needs, while two workers fill 2,000 drafted 1280 x 960 photos in 3.8 s. Workers touch no torch state
    # (_start_worker); 100 fills forked beside a thread running torch matmuls all finished, equal to serial ones.
    children_before = set(multiprocessing.active_children())
    pool = concurrent.futures.ProcessPoolExecutor(processes, multiprocessing.get_context("fork"), _start_worker,
                                                  (job, os.getpid())) if processes > 1 else None
    in_flight, kept, captions, bad, segments, bar = collections.deque(), 0, [], [], [], None
    try:
        for start, part in itertools.chain(chunks, [(None, None)]):
            if start is not None:
                in_flight.append((start, len(part), pool.submit(_worker_chunk, start, part) if pool else
                                  _done(fill_chunk, job, start, part)))
            # The bar after the first submit, which forks the workers: no tqdm thread to fork beside.
            bar = bar or tqdm(total=len(table), desc=f"{job.what} images", unit="img", file=sys.stderr,
                              leave=False, disable=not sys.stderr.isatty())
            while in_flight and (start is None or len(in_flight) >= (2 * processes if pool else 1)):
                first, n, future = in_flight.popleft()
                good, crc, refs, errors = chunk_result(future, job.what, first, n)
                bad += errors
                if errors and job.stop_at_bad:
                    raise DataError(errors[0])
                if good:
                    if first != kept:
                        job.slots.move(kept * job.row_bytes, first * job.row_bytes, good * job.row_bytes)
                    kept += good
                    segments.append([good, crc])
                    captions += refs
                bar.update(n)
    except BaseException:
        # Killed, not waited for (a Ctrl-C waited over 10 s for the chunks already queued): what they were
        # writing is thrown away with the .tmp folder or the memory. Every process forked since the pool was
        # made, not only those it lists: a stop that lands between a worker's fork and the pool's note of it
        # leaves one the pool does not know of, which multiprocessing would wait for at exit, forever.
        for process in set(multiprocessing.active_children()) - children_before if pool else ():
            process.kill()
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return kept, captions, bad, segments


def fill_chunk(job, start, rows):
    """Decode and preprocess rows ((index, image cell, caption cell) each) and write the good
    ones' pixels to slots start, start+1, ... -> (good rows, crc32 of their pixels, their captions,
    the bad rows' messages)."""
    block = np.empty((len(rows), *job.shape), dtype=np.uint8)
    captions, bad = [], []
    for i, image_cell, caption_cell in rows:
        try:
            image, refs = read_cells(job, i, image_cell, caption_cell)
        except DataError as e:
            bad.append(str(e))
            if job.stop_at_bad:
                break
            continue
        # One image at a time: a chunk of full-size photos never sits decoded in memory; the
        # processor's own per-call cost was under 0.1 ms an image here.
        pixels = to_pixels(job.image_processor, [image])[0]
        if pixels.shape != job.shape:
            raise DataError(f"{job.what} row {i}: preprocessed to {pixels.shape}, other images to {job.shape}; "
                            f"the image processor must resize and crop every image to one size")
        block[len(captions)] = pixels
        captions.append(refs)
    good = block[:len(captions)]
    job.slots.write(start * job.row_bytes, good)
    return len(captions), zlib.crc32(good), captions, bad


def read_cells(job, i, image_cell, caption_cell):
    """sources.read_row for one row's two cells, opening JPEGs at job.draft. A row it would refuse
    goes to read_row itself, so that bad rows are named in its words whatever the draft."""
    row = {job.image_column: image_cell, job.text_column: caption_cell}
    _, source = sources.image_cell(image_cell, i)
    refs = sources.caption_refs(caption_cell)
    if job.draft and source is not None and refs:
        try:
            return decode.open_image(source, draft=job.draft, max_pixels=job.max_pixels), refs
        except DataError:
            pass  # read_row opens it again, in full, and names the row as it does
    return sources.read_row(row, i, job.image_column, job.text_column, job.what, job.max_pixels)


def chunk_result(future, what, start, n):
    try:
        return future.result()
    except concurrent.futures.BrokenExecutor:  # BrokenProcessPool
        raise DataError(f"{what} split: a process decoding its images died (killed, or crashed in an image decoder) "
                        f"with rows {start}-{start + n - 1} not done") from None


def _done(fn, *args):
    future = concurrent.futures.Future()
    future.set_result(fn(*args))
    return future


_job = None  # a worker's Fill


def _start_worker(job, parent):
    global _job
    _job = job
    workers.start(parent)  # the parent's locks let go, stop signals left to it, killed with it
    # As DataLoader's forked workers do: the parent's OpenMP threads do not exist here, so a torch op (an image
    # processor's torchvision backend) must not try to use them.
    torch.set_num_threads(1)


def _worker_chunk(start, rows):
    return fill_chunk(_job, start, rows)


class FileSlots:
    """Rows of pixels in a file, written and moved with pwrite/pread (a full disk raises OSError
    where a memory map would kill the process with SIGBUS). Forked workers share the descriptor."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, offset, array):
        view = memoryview(np.ascontiguousarray(array).reshape(-1))
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def move(self, to, start, n, piece=16 << 20):
        for k in range(0, n, piece):
            self.write(to + k, np.frombuffer(os.pread(self.fd, min(piece, n - k), start + k), dtype=np.uint8))


class MemorySlots:
    """Rows of pixels in shared memory (an anonymous mapping forked workers write into)."""

    def __init__(self, size):
        self.map = mmap.mmap(-1, max(size, 1))

    def write(self, offset, array):
        view = memoryview(np.ascontiguousarray(array).reshape(-1))
        self.map[offset:offset + len(view)] = view

    def move(self, to, start, n):
        self.map.move(to, start, n)

    def array(self, rows, shape):
        if not rows:
            return np.zeros((0, *shape), dtype=np.uint8)
        return np.frombuffer(self.map, dtype=np.uint8, count=rows * int(np.prod(shape))).reshape(rows, *shape)


def open_entry(folder, verify):
    """(memory-mapped pixels, index) of the complete entry in folder; None when there is none;
    CacheDamaged when it is incomplete or its pixels do not match their checksums."""
    if not os.path.exists(folder):
        return None
    try:
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        # The captions train and evaluate on come from here: a flipped bit in one must not pass for a caption.
        intact = index.pop("index_crc32") == index_checksum(index)
        shape, size, segments = tuple(index["shape"]), index["bytes"], index["segments"]
        consistent = (len(shape) == 4 and size == int(np.prod(shape)) and len(index["captions"]) == shape[0]
                      == sum(n for n, _ in segments) and isinstance(index["skipped"], list))
    except FileNotFoundError:
        raise CacheDamaged("index.json is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CacheDamaged(f"index.json is unreadable: {type(e).__name__}") from None
    if not intact:
        raise CacheDamaged("index.json does not match its checksum")
    if not consistent:
        raise CacheDamaged("index.json contradicts itself")
    path = os.path.join(folder, "pixels.u8")
    try:
        actual = os.path.getsize(path)
    except FileNotFoundError:
        raise CacheDamaged("pixels.u8 is missing") from None
    if actual != size:
        raise CacheDamaged(f"pixels.u8 holds {actual:,} bytes, index.json says {size:,}")
    if verify is not False:
        check_segments(path, segments, size // max(shape[0], 1), everything=verify or size <= FULL_CHECK_BYTES)
    pixels = np.memmap(path, dtype=np.uint8, mode="r", shape=shape) if shape[0] else np.zeros(shape, dtype=np.uint8)
    return pixels, index


def index_checksum(index):
    """crc32 of an index's canonical JSON: what was written and what is read back parse to the same text."""
    return zlib.crc32(json.dumps(index, sort_keys=True).encode())


def check_segments(path, segments, row_bytes, everything):
    """CacheDamaged unless each chunk of the pixel file (all, or SAMPLED_SEGMENTS spread over
    it) has the crc32 written for it."""
    starts = list(itertools.accumulate((n for n, _ in segments), initial=0))
    picked = range(len(segments)) if everything or len(segments) <= SAMPLED_SEGMENTS else \
        sorted({round(k * (len(segments) - 1) / (SAMPLED_SEGMENTS - 1)) for k in range(SAMPLED_SEGMENTS)})
    buffer = bytearray(max((n for n, _ in segments), default=0) * row_bytes)
    with open(path, "rb", buffering=0) as f:
        for k in picked:
            n, crc = segments[k]
            view = memoryview(buffer)[:n * row_bytes]
            f.seek(starts[k] * row_bytes)
            got = 0
            while got < len(view):
                got += f.readinto(view[got:]) or len(view)  # a short file was caught by the size check
            if zlib.crc32(view) != crc:
                raise CacheDamaged(f"the pixels of images {starts[k]}-{starts[k] + n - 1} do not match their checksum")


def open_or_build(folder, table, job, chunk, num_workers, verify, notify):
    """Holding the entry's lock: the complete entry, built (or rebuilt when damaged) first if need be."""
    try:
        entry = open_entry(folder, verify)
        if entry is not None:
            return entry  # another process built it while this one waited
    except CacheDamaged as e:
        notify(f"image cache entry {folder} is damaged ({e}): rebuilding it")
        shutil.rmtree(folder)
    won = build_entry(folder, table, job, chunk, num_workers)
    return open_entry(folder, False if won else verify)  # just written and checksummed by this process


def build_entry(folder, table, job, chunk, num_workers):
    """Fill {folder}.tmp-PID and rename it to folder. False when a complete entry got there first
    (only without file locks): that one is kept."""
    tmp = f"{folder}.tmp-{os.getpid()}"
    _filling.add(tmp)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process that had this PID
        os.makedirs(tmp)
        with open(os.path.join(tmp, "host"), "w") as f:  # remove_leftovers judges only this machine's PIDs
            f.write(socket.gethostname())
        fd = os.open(os.path.join(tmp, "pixels.u8"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            reserve(fd, len(table) * job.row_bytes)
            job.slots = FileSlots(fd)
            kept, captions, bad, segments = fill(table, job, chunk, num_workers)
            os.ftruncate(fd, kept * job.row_bytes)
        finally:
            os.close(fd)
        index = {"version": CACHE_VERSION, "shape": [kept, *job.shape], "bytes": kept * job.row_bytes,
                 "checksum": "crc32 of each chunk of rows", "segments": segments, "draft": job.draft,
                 "captions": captions, "skipped": bad}
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump({**index, "index_crc32": index_checksum(index)}, f)
        try:
            os.rename(tmp, folder)  # never replaces a complete entry: a folder that is not empty stays
            return True
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _filling.discard(tmp)


def reserve(fd, size):
    """Claim the disk space up front: a full disk fails here, before any decoding."""
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        os.ftruncate(fd, size)  # a file system without fallocate


@contextlib.contextmanager
def cache_lock(cache_dir, notify):
    """One process at a time fills or repairs entries in a cache folder; the others wait, then read
    what it made (two fills at once would only share the same cores). A lock on the folder itself,
    which holds nothing but entries; the kernel releases it when its process dies."""
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notify(f"waiting for another process to finish filling the image cache in {cache_dir}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: build_entry's rename still keeps the first complete entry
        workers.hold(fd)  # the fill's worker processes must not keep it held after this process is gone
        yield
    finally:
        workers.let_go(fd)
        os.close(fd)  # and with it the lock


TMP_NAME = re.compile(r".+\.tmp-(\d+)")


def remove_leftovers(cache_dir, notify):
    """Remove the .tmp-PID folders of fills whose process is gone (killed, or the machine
    restarted). A live process's is left alone, and so is another machine's (a shared cache)."""
    host = socket.gethostname()
    for name in os.listdir(cache_dir):
        match, path = TMP_NAME.fullmatch(name), os.path.join(cache_dir, name)
        if not match or path in _filling or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "host")) as f:
                owner = f.read().strip()
        except OSError:
            owner = host  # written first: the fill died at once, or CACHE_VERSION 1 made it
        pid = int(match[1])
        # This process's own PID on a folder it is not filling: an earlier process's, with the PID reused
        # (a container restarted).
        if owner != host or (pid != os.getpid() and process_alive(pid)):
            continue
        size = sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
        shutil.rmtree(path, ignore_errors=True)
        notify(f"removed {path} ({size / 2**20:.1f} MB), the unfinished image cache fill of process {pid}, "
               f"which is gone")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True
