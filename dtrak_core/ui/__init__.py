"""The browser app: the only package that imports gradio.

One module per tab, each with its layout (`create_ui`) and its wiring (`create_event_handlers`), and
its handlers as plain functions that tests call directly:

- `state`: the loaded model folders (one per process, shared read-only by every visitor) and the
  folder a request works on;
- `generate`, `attribute`, `counterfactual`, `benchmarks`, `about`: the tabs of a pixel folder;
- `banner`: what the damaged-files banner says;
- `text2image`: the tabs of a text-to-image folder;
- `serving`: the queue, the per-visitor limits and the upload gate, on Gradio's public API;
- `page`: the one page, with a model picker over every folder, and the start-up warm-up.

`app.py` is the entry point: `page.build_demo()` then `page.serve(demo)`.
"""
