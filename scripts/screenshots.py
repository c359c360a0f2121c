"""Make the pictures of the README and docs from a real run, the way a user sees them.

1. Start the real ``tensorboard`` server over a log dir (default: the demo's, ``make demo``).
2. Save the images it serves for one layer (heatmaps, init vs now, evolution, radial
   profile) and the all-layers pictures (the radius chart, every layer's heatmap on one
   scale) as PNGs: exactly what the callback logged.
3. Open TensorBoard in headless Chromium (Debian's ``chromium``) and save screenshots of the
   IMAGES, SCALARS and HPARAMS tabs, with TensorBoard's default settings.

Run:  .venv/bin/python scripts/screenshots.py [--logdir erf_demo_logs] [--out docs/images]
Needs ``chromium`` on PATH (``apt-get install chromium``) for step 3.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers.tensorboard import get, get_json, poll, tensorboard_server

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1600,1200",
    "--virtual-time-budget=15000",
]

# (file name, TensorBoard URL fragment): the tabs a newcomer opens, filtered to erf tags.
VIEWS = [
    ("tensorboard_images.png", "#images&tagFilter=" + urllib.parse.quote("all_layers|init_vs_now")),
    (
        "tensorboard_scalars.png",
        "#scalars&tagFilter=" + urllib.parse.quote("^erf/") + "&_smoothingWeight=0",
    ),
    ("tensorboard_hparams.png", "#hparams"),
]


def save_served_images(url: str, run: str, layer: str, prefix: str, out: str) -> list[str]:
    """The newest image of each of ``layer``'s tags (and the all-layers chart), as served."""
    saved = []
    tags = {
        f"{prefix}/{layer}/{kind}": f"{layer}_{kind}.png"
        for kind in ("heatmap", "heatmap_log", "init_vs_now", "evolution", "radial_profile")
    }
    tags[f"{prefix}/all_layers/radius"] = "all_layers_radius.png"
    tags[f"{prefix}/all_layers/heatmaps"] = "all_layers_heatmaps.png"
    for tag, name in tags.items():
        entries = get_json(url, "/data/plugin/images/images", {"run": run, "tag": tag})
        body = get(url, "/data/plugin/images/individualImage?" + entries[-1]["query"])
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(body)
        saved.append(path)
    return saved


def screenshot(url: str, path: str, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}", url]
        subprocess.run(cmd, check=True, timeout=180, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="erf_demo_logs")
    parser.add_argument("--out", default=os.path.join("docs", "images"))
    parser.add_argument("--layer", default="stage3")
    parser.add_argument("--prefix", default="erf")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with tensorboard_server(args.logdir) as url:
        needed = f"{args.prefix}/all_layers/radius"
        tags = poll(
            lambda: get_json(url, "/data/plugin/images/tags"),
            lambda t: any(needed in run_tags for run_tags in t.values()),
            timeout=120,
        )
        run = sorted(r for r, t in tags.items() if needed in t)[-1]  # the newest version
        with open(os.path.join(args.logdir, run, "erf_history.csv")) as f:
            last = max(int(row["step"]) for row in csv.DictReader(f))
        # The server loads event files gradually: wait until it serves the last probe.
        poll(
            lambda: get_json(url, "/data/plugin/images/images", {"run": run, "tag": needed}),
            lambda e: bool(e) and e[-1]["step"] == last,
            timeout=120,
        )
        for path in save_served_images(url, run, args.layer, args.prefix, args.out):
            print("saved", path)
        if chromium is None:
            print("chromium not found: no screenshots (apt-get install chromium)")
            return
        for name, fragment in VIEWS:
            path = os.path.join(args.out, name)
            screenshot(f"{url}/{fragment}", path, chromium)
            print("saved", path)


if __name__ == "__main__":
    main()
