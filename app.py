"""D-TRAK explorer: generate images with the embedded diffusion models, see which training images
made them, and check by removing those images and retraining.

    python app.py                                    # http://127.0.0.1:7860: every folder under ./assets
    DTRAK_ASSETS=path/to/folder python app.py        # one model folder of your own
    DTRAK_ASSETS=assets:assets/fashion python app.py # several (separated by os.pathsep)

One page serves every model folder: the digits, Fashion-MNIST and the text-to-image miniature, each on
its own route, picked in the navigation bar. The page is built by `dtrak_core.ui.page` (one module per
tab under `dtrak_core/ui/`); every computation is a `dtrak_core` call. The model folders are loaded
once per process and shared read-only by every visitor; per-visitor selections live in `gr.State`.

Start-up: the server serves as soon as the folders are loaded and checked by their small files; a
background warm-up computes the first page's samples, then what a first click needs, and last the
full check of the large files, whose findings the page's banner reports.
"""
from __future__ import annotations

import dtrak_core  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads)

# isort: split
from dtrak_core.ui import page


def main() -> None:
    page.start_warm_up()  # the first page's samples are computed while the page is built
    page.serve(page.build_demo())


if __name__ == "__main__":
    main()
