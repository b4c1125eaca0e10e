#!/usr/bin/env python3
"""Regenerate the two small real datasets under nn/data/ from scikit-learn's bundled copies.

    python3 scripts/make_fixtures.py [--wheel PATH_TO_SCIKIT_LEARN_WHEEL]

Without --wheel it runs `pip download --no-deps scikit-learn==SKLEARN_VERSION` into a
temporary directory (PyPI only; nothing is installed) and reads the data files straight out
of the wheel (a zip). Only the standard library is needed. Output is deterministic: the
source files are checked against known SHA-256 sums, and gzip is written with mtime=0.

Writes:
  nn/data/breast-cancer/wdbc.csv       UCI Breast Cancer Wisconsin (Diagnostic), 569 x 30 + label
  nn/data/digits-8x8/*-idx?-ubyte.gz   UCI Optical Recognition of Handwritten Digits, 8x8, 0..16,
                                       MNIST-style IDX; first 1,497 = train, last 300 = t10k
(The README.md files beside them are written by hand and not touched here.)
"""

import argparse
import csv
import glob
import gzip
import hashlib
import io
import os
import struct
import subprocess
import sys
import tempfile
import zipfile

SKLEARN_VERSION = "1.9.1"

# SHA-256 of the bundled files in scikit-learn 1.9.1 (they have been unchanged for years;
# if a different wheel is used and a sum differs, the script stops rather than silently
# producing different fixtures).
SHA256 = {
    "sklearn/datasets/data/breast_cancer.csv": "fed3eb72d0575ef6192293f5093c6e801b1476b577d0386bf4455504522172ed",
    "sklearn/datasets/data/digits.csv.gz": "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
}

# Feature names exactly as sklearn.datasets.load_breast_cancer() reports them
# (sklearn/datasets/_base.py), in column order: 10 means, 10 standard errors, 10 "worst".
BASE = [
    "radius", "texture", "perimeter", "area", "smoothness", "compactness",
    "concavity", "concave points", "symmetry", "fractal dimension",
]
WDBC_FEATURES = (
    ["mean " + b for b in BASE] + [b + " error" for b in BASE] + ["worst " + b for b in BASE]
)
# sklearn's csv header is "569,30,malignant,benign": target 0 = malignant, 1 = benign.
WDBC_LABELS = {0: "malignant", 1: "benign"}

DIGITS_TRAIN = 1497
DIGITS_TEST = 300

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fetch_wheel(tmp):
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "-q", "-d", tmp, "scikit-learn==" + SKLEARN_VERSION],
        check=True,
    )
    wheels = glob.glob(os.path.join(tmp, "scikit_learn-*.whl"))
    if len(wheels) != 1:
        sys.exit("expected one scikit-learn wheel in %s, found %r" % (tmp, wheels))
    return wheels[0]


def read_member(whl, name):
    with zipfile.ZipFile(whl) as z:
        data = z.read(name)
    got = hashlib.sha256(data).hexdigest()
    if got != SHA256[name]:
        sys.exit("%s: sha256 %s, expected %s" % (name, got, SHA256[name]))
    return data


def check_feature_names(whl):
    with zipfile.ZipFile(whl) as z:
        base = z.read("sklearn/datasets/_base.py").decode("utf-8")
    pos = 0
    for name in WDBC_FEATURES:
        i = base.find('"%s"' % name, pos)
        if i < 0:
            sys.exit("feature name %r not found in order in sklearn/datasets/_base.py" % name)
        pos = i


def write_wdbc(raw, out_dir):
    lines = raw.decode("ascii").splitlines()
    head = lines[0].split(",")
    if head != ["569", "30", "malignant", "benign"]:
        sys.exit("unexpected breast_cancer.csv header %r" % head)
    rows = []
    for line in lines[1:]:
        f = line.split(",")
        if len(f) != 31:
            sys.exit("bad row %r" % line)
        for v in f[:30]:
            float(v)  # must parse; the text itself is kept as is
        rows.append(f[:30] + [WDBC_LABELS[int(f[30])]])
    if len(rows) != 569:
        sys.exit("expected 569 rows, got %d" % len(rows))
    os.makedirs(out_dir, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(WDBC_FEATURES + ["diagnosis"])
    w.writerows(rows)
    with open(os.path.join(out_dir, "wdbc.csv"), "w", newline="") as fh:
        fh.write(buf.getvalue())
    return rows


def gz_write(path, payload):
    with open(path, "wb") as fh:
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=9, mtime=0) as g:
            g.write(payload)


def write_digits(raw_gz, out_dir):
    text = gzip.decompress(raw_gz).decode("ascii")
    images, labels = [], []
    for line in text.splitlines():
        f = [int(v) for v in line.split(",")]
        if len(f) != 65:
            sys.exit("bad digits row")
        px, lab = f[:64], f[64]
        if not all(0 <= p <= 16 for p in px) or not 0 <= lab <= 9:
            sys.exit("digits value out of range")
        images.append(bytes(px))
        labels.append(lab)
    if len(images) != DIGITS_TRAIN + DIGITS_TEST:
        sys.exit("expected 1797 digits, got %d" % len(images))
    os.makedirs(out_dir, exist_ok=True)
    splits = {
        "train": (images[:DIGITS_TRAIN], labels[:DIGITS_TRAIN]),
        "t10k": (images[DIGITS_TRAIN:], labels[DIGITS_TRAIN:]),
    }
    for prefix, (imgs, labs) in splits.items():
        n = len(imgs)
        gz_write(os.path.join(out_dir, prefix + "-images-idx3-ubyte.gz"),
                 struct.pack(">IIII", 0x00000803, n, 8, 8) + b"".join(imgs))
        gz_write(os.path.join(out_dir, prefix + "-labels-idx1-ubyte.gz"),
                 struct.pack(">II", 0x00000801, n) + bytes(labs))
    return splits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", help="use this scikit-learn wheel instead of downloading one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        whl = args.wheel or fetch_wheel(tmp)
        check_feature_names(whl)
        bc = read_member(whl, "sklearn/datasets/data/breast_cancer.csv")
        dg = read_member(whl, "sklearn/datasets/data/digits.csv.gz")
    rows = write_wdbc(bc, os.path.join(ROOT, "nn", "data", "breast-cancer"))
    counts = {lab: sum(r[-1] == lab for r in rows) for lab in ("malignant", "benign")}
    print("wdbc.csv: %d rows, %r" % (len(rows), counts))
    splits = write_digits(dg, os.path.join(ROOT, "nn", "data", "digits-8x8"))
    for prefix, (imgs, labs) in splits.items():
        print("digits %s: %d, per class %r" % (prefix, len(labs), [labs.count(c) for c in range(10)]))


if __name__ == "__main__":
    main()
