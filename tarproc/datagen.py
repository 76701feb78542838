"""Generate small, realistic datasets of tar shards for the demo, the tests and the benchmarks.

The shards look like the collections tarproc is for: ImageNet-like samples (a real JPEG made by
ImageMagick, a class label, JSON metadata), OCR-like line images (`bin.png`, `lines.png`, `text`)
and text documents for word counts. They are written with Python's own `tarfile` (another tool
than ours, so tests of our reader are not circular) and are deterministic for a given seed.

    python -m tarproc.datagen imagenet DIR --shards 4 --samples 50
"""

import argparse
import gzip
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile

SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
           "n01496331", "n01498041", "n01514668", "n01514859", "n01518878"]
WORDS = ("the of and to in is was he for it with as his on be at by had are but from or have an "
         "they which one you were all we her she there would their will when who him been has more "
         "if no out so said what up its about into than them can only other time new some could "
         "these two may first then do any like my now over such our man me even most made after "
         "also did many off before must well back through years much where your way down should").split()


def _convert_binary():
    """The real ImageMagick `convert` (Debian's), else whatever is on PATH."""
    for candidate in ("/usr/bin/convert", shutil.which("convert")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise RuntimeError("ImageMagick `convert` is needed to make JPEG/PNG test data (apt-get install imagemagick)")


def make_images(n, width=256, height=256, fmt="jpg", seed=0, quality=90):
    """n distinct real images encoded by ImageMagick, as bytes (one `convert` run for all of them).

    Random RGB noise at 256x256 and quality 90 gives ~100 KB JPEGs, the size of ImageNet images.
    """
    if n == 0:
        return []
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="tarproc-datagen-") as tmp:
        ppm = os.path.join(tmp, "all.ppm")
        with open(ppm, "wb") as stream:
            for _ in range(n):
                stream.write(b"P6 %d %d 255\n" % (width, height))
                stream.write(rng.randbytes(width * height * 3))
        outpat = os.path.join(tmp, f"img-%06d.{fmt}")
        subprocess.run([_convert_binary(), ppm, "-quality", str(quality), outpat], check=True)
        images = []
        for i in range(n):
            with open(outpat % i, "rb") as stream:
                images.append(stream.read())
        return images


def write_tar(path, samples, compress=None):
    """Write samples (dicts of key + bytes fields) with Python's tarfile, streaming to the file.

    gzip (by default for `.tgz`/`.tar.gz` names) has no file name and mtime 0 in its header, so
    the same samples give the same bytes.
    """
    compress = compress if compress is not None else path.endswith((".tgz", ".tar.gz"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as raw:
        stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
        with stream, tarfile.open(fileobj=stream, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for sample in samples:
                for ext, value in sample.items():
                    if ext.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(value)
                    info.mtime = 1600000000
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(value))
    return path


def imagenet_samples(count, start=0, seed=0, width=256, height=256, distinct=None):
    """ImageNet-like samples: KEY.jpg (a real JPEG), KEY.cls (class index), KEY.json.

    `distinct` limits how many different JPEGs are encoded (they are reused round-robin), which
    keeps generating large sets fast.
    """
    rng = random.Random(seed * 1000003 + start)
    images = make_images(min(count, distinct or count), width, height, "jpg", seed=seed * 7919 + start)
    samples = []
    for i in range(count):
        cls = rng.randrange(len(SYNSETS))
        key = f"{SYNSETS[cls]}_{start + i:07d}"
        meta = {"synset": SYNSETS[cls], "cls": cls, "width": width, "height": height}
        samples.append({"__key__": key, "cls": str(cls).encode(),
                        "jpg": images[i % len(images)],
                        "json": json.dumps(meta, sort_keys=True).encode()})
    return samples


def uw3_samples(count, start=0, seed=0):
    """OCR-like line samples: KEY.bin.png, KEY.lines.png (real PNGs) and KEY.text; every 5th lacks lines.png."""
    rng = random.Random(seed * 7 + start)
    pngs = make_images(min(count, 8), 48, 16, "png", seed=seed + start)
    samples = []
    for i in range(count):
        key = f"book{(start + i) // 100:04d}/page{(start + i) % 100:03d}"
        sample = {"__key__": key, "bin.png": pngs[i % len(pngs)],
                  "text": " ".join(rng.choice(WORDS) for _ in range(6)).encode()}
        if i % 5 != 4:
            sample["lines.png"] = pngs[(i + 1) % len(pngs)]
        samples.append(sample)
    return samples


def word_samples(count, start=0, seed=0, words_per_doc=20):
    """Text documents: KEY.txt of random common words (for word counts and sorting by field)."""
    rng = random.Random(seed * 31 + start)
    return [{"__key__": f"doc{start + i:07d}",
             "txt": " ".join(rng.choice(WORDS) for _ in range(words_per_doc)).encode()}
            for i in range(count)]


KINDS = {"imagenet": ("imagenet_train-{:04d}.tgz", imagenet_samples),
         "uw3": ("Volume_{:02d}.tgz", uw3_samples),
         "words": ("words-{:d}.tar", word_samples)}


def write_dataset(kind, directory, shards=4, samples=50, seed=0, name=None):
    """Write `shards` shards of `samples` samples each into `directory`; returns their paths."""
    template, make = KINDS[kind]
    template = name or template
    paths = []
    for s in range(shards):
        batch = make(samples, start=s * samples, seed=seed)
        paths.append(write_tar(os.path.join(directory, template.format(s)), batch))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tarproc.datagen", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("directory")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=50, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="file name template, e.g. 'Volume_{:04d}.tgz'")
    args = parser.parse_args(argv)
    for path in write_dataset(args.kind, args.directory, args.shards, args.samples, args.seed, args.name):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
