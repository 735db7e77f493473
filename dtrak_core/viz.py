"""What the app shows, as plain objects a notebook can show too: plotly figures and HTML strings.

    from IPython.display import HTML
    from dtrak_core import Attributor, viz
    attributor = Attributor.load("assets")
    result = attributor.attribute(image, "d-trak")
    viz.score_histogram(result, 8).show()
    HTML(viz.training_cards(attributor.train, result, result.proponents(8), "Top-8 proponents"))

Figures: `score_histogram`, `class_mass_figure`, `noise_level_figure`, `lds_chart`,
`counterfactual_chart`, `benchmark_chart`. HTML: `training_cards` (the proponent / opponent
grids; each card carries its training index in `data-index`, which the app turns into a click),
`noise_level_cards`, `training_image_details` (one training image under every method),
`image_pairs` (before / after pictures) and `counterfactual_summary` (the harness's tables). No
gradio here.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np
import plotly.graph_objects as go

from dtrak_core import app_support as sup
from dtrak_core.attribution import methods as registry
from dtrak_core.images import to_pil

PROPONENT, OPPONENT, NEUTRAL = "#16a34a", "#dc2626", "#94a3b8"
TEST_SET_COLORS = {"validation": "#2563eb", "generated": "#f97316"}
THUMB_PX = 64  # display size of a training image card; images are upscaled by whole factors
# the legend above the plot, the tool bar down its right side (on a phone they would overlap)
_LAYOUT = dict(template="plotly_white", margin=dict(l=10, r=30, t=40, b=10), modebar=dict(orientation="v"),
               legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))


def png_data_uri(img) -> str:
    """A PIL image as an inline PNG (`<img src=...>`)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _scale(image, px: int) -> int:
    return max(1, px // int(image.shape[-1]))


def _range(train) -> tuple:
    return getattr(train, "value_range", (-1.0, 1.0))


def _img(image, px: int, alt: str, value_range=(-1.0, 1.0)) -> str:
    """An <img> of a model image (C, H, W) with pixels in `value_range` upscaled to about `px`
    pixels, or of a PIL image as it is."""
    pil = image if hasattr(image, "save") else to_pil(image, _scale(image, px), value_range)
    return f'<img src="{png_data_uri(pil)}" alt="{html.escape(alt)}">'


# ---------------------------------------------------------------- attribution: cards and charts

def training_cards(train, attribution, indices, title: str, class_word: str = "digit", note: str = "",
                   class_names=None) -> str:
    """Training images as an HTML grid of cards: the pixels (nearest-neighbour), then index, class
    and score underneath (captions never cover pixels), and a text-to-image image's caption; the
    image's file (relative to the data folder) in the card's tooltip. `train`: a `data.Dataset`;
    `class_names`: the labels' names (None: the dataset's own, e.g. a folder's class sub-folders).
    A named class shows its name above "<class_word> <label>", the label the class chart plots."""
    class_names = getattr(train, "classes", None) if class_names is None else class_names
    cards = []
    for rank, i in enumerate(indices, 1):
        i = int(i)
        score = attribution.scores[i]
        label = int(attribution.labels[i])
        named = _describe(train, i)
        where = f" ({named['path']})" if "path" in named else ""
        caption = named.get("caption")
        cards.append(
            f'<figure class="card" data-index="{i}" role="button" tabindex="0" '
            f'title="{html.escape(f"training image #{i}{where}: click for its rank under every method")}">'
            f'{_img(train.images[i], THUMB_PX, f"training image {i}", _range(train))}<figcaption><b>#{i}</b><br>'
            f'{_label_text(label, class_word, class_names)}'
            + ("" if caption is None else
               f'<span class="muted card-caption" title="{html.escape(caption)}">{html.escape(caption)}</span>')
            + f'<span class="{"pos" if score >= 0 else "neg"}">{score:+.3g}</span></figcaption></figure>')
    note = f'<div class="cards-note">{note}</div>' if note else ""
    return f'<div class="cards-title">{html.escape(title)}</div>{note}<div class="cards">{"".join(cards)}</div>'


def _describe(train, index: int) -> dict:
    """`Dataset.describe` of a training image ({} for a dataset-like object without it)."""
    describe = getattr(train, "describe", None)
    return {} if describe is None else describe(index)


def _label_text(label: int, class_word: str, class_names) -> str:
    if label < 0:
        return ""
    number = f"{class_word} {label}<br>"
    if class_names is not None and label < len(class_names) and str(class_names[label]) != str(label):
        return f"{html.escape(str(class_names[label]))}<br>{number}"
    return number


def score_histogram(attribution, k: int) -> go.Figure:
    """Every training image's score, with the top-k proponents and opponents (of a signed method) marked."""
    scores = attribution.scores
    signed = getattr(attribution, "signed", True)
    marked = [(attribution.proponents(k), PROPONENT, f"top-{k} proponents")]
    if signed:
        marked.append((attribution.opponents(k), OPPONENT, f"top-{k} opponents"))
    fig = go.Figure()
    fig.add_histogram(x=scores, nbinsx=80, marker_color=NEUTRAL, name="all training images",
                      hovertemplate="score %{x}<br>%{y} images<extra></extra>")
    for idx, color, name in marked:
        fig.add_scatter(x=scores[idx], y=np.zeros(len(idx)), mode="markers", name=name, customdata=idx,
                        marker=dict(color=color, size=11, symbol="triangle-up", line=dict(width=1, color="white")),
                        hovertemplate="#%{customdata}<br>score %{x:.4g}<extra></extra>")
    lo, hi = sup.top_k_thresholds(scores, k)
    fig.add_vline(x=hi, line=dict(color=PROPONENT, dash="dash", width=1))
    if signed:
        fig.add_vline(x=lo, line=dict(color=OPPONENT, dash="dash", width=1))
    fig.update_layout(**_LAYOUT, height=320, bargap=0.05, yaxis_title="images",
                      xaxis_title=f"attribution score ({len(scores):,} training images)")
    return fig


def _class_name(label: int, class_names) -> str | None:
    """A training label's class name, where the folder names it other than by the label itself."""
    label = int(label)
    if class_names is not None and 0 <= label < len(class_names) and str(class_names[label]) != str(label):
        return str(class_names[label])
    return None


def _class_label(label: int, class_word: str, class_names) -> str:
    """A training label as a chart names it: its class name, else "<class_word> <label>"."""
    return _class_name(label, class_names) or f"{class_word} {int(label)}"


def class_mass_figure(attribution, word: str = "digit", class_names=None) -> go.Figure:
    """Share of the positive (proponent) and negative (opponent) score carried by each class,
    against each class's share of the training set; the axis names each class (`class_names`: the
    labels' names, None: the attribution's training set's own, else the label)."""
    if class_names is None:
        class_names = getattr(getattr(attribution, "train", None), "classes", None)
    fig = go.Figure()
    layout = dict(_LAYOUT, height=320)
    if (attribution.labels < 0).any():
        fig.add_annotation(text="The training images have no class labels<br>(one sub-folder per class gives them)",
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(**layout, xaxis=dict(visible=False), yaxis=dict(visible=False))
        return fig
    mass = sup.class_mass(attribution.scores, attribution.labels)
    present = np.flatnonzero(mass["count"])  # classes with training images (a fine-tuning set may hold a few)
    mass = {k: v[present] for k, v in mass.items()}
    # each class by its name, else by its label (the axis title says what the numbers are)
    hover = [html.escape(_class_label(c, word, class_names)) for c in present]
    classes = [_class_name(c, class_names) or str(c) for c in present]
    base = mass["count"] / mass["count"].sum()
    fig.add_bar(x=classes, y=mass["positive"], name="proponent mass", marker_color=PROPONENT, customdata=hover,
                hovertemplate="%{customdata}: %{y:.1%} of the positive score<extra></extra>")
    fig.add_bar(x=classes, y=mass["negative"], name="opponent mass", marker_color=OPPONENT, customdata=hover,
                hovertemplate="%{customdata}: %{y:.1%} of the negative score<extra></extra>")
    fig.add_scatter(x=classes, y=base, mode="markers", name="share of training set", customdata=hover,
                    marker=dict(symbol="line-ew-open", size=22, color="#334155", line=dict(width=2)),
                    hovertemplate="%{customdata}: %{y:.1%} of the training images<extra></extra>")
    fig.update_layout(**layout, barmode="group", xaxis=dict(title=f"training {word}", type="category"),
                      yaxis=dict(tickformat=".0%", title="share of the mass"))
    return fig


def noise_level_rows(levels, per_bucket: int = 2, overall: int = 4) -> list[int]:
    """The training images worth a row in the noise-level view: the overall top proponents, then
    each bucket's strongest ones, ordered by the bucket where they matter most (low noise first)."""
    rows = list(dict.fromkeys([*np.argsort(-levels.scores, kind="stable")[:overall].tolist(),
                               *[int(i) for b in range(len(levels.timesteps)) for i in levels.top(b, per_bucket)]]))
    return sorted(rows, key=lambda i: (int(np.argmax(levels.centred[:, i])), -levels.scores[i]))


def noise_level_figure(levels, labels: np.ndarray, class_word: str = "digit", rows=None, class_names=None) -> go.Figure:
    """Heatmap: for the query's strongest training images (rows), how much of each one's score comes
    from each noise level (columns, low noise on the left), less the reference queries' mean part
    when the levels are centred (`NoiseLevels.centred`). Green pushes towards the query, red away.
    Each row names its image's class (`class_names`: the labels' names, None: the labels)."""
    rows = noise_level_rows(levels) if rows is None else list(rows)
    z = levels.centred[:, rows].T  # (rows, buckets)
    centred = levels.reference is not None
    what = "part of its score beyond the reference queries' mean" if centred else "part of its score"
    names = [f"#{i}" + (f" ({_class_label(labels[i], class_word, class_names)})" if labels[i] >= 0 else "")
             for i in rows]
    peak = float(np.abs(z).max()) or 1.0
    text = [[f"{v:+.3g}" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=levels.labels(), y=names, zmin=-peak, zmax=peak, zmid=0, text=text, customdata=np.array(rows)[:, None]
        .repeat(z.shape[1], 1), colorscale=[[0, OPPONENT], [0.5, "#f8fafc"], [1, PROPONENT]],
        colorbar=dict(title=dict(text="part of the<br>score, centred" if centred else "part of<br>the score",
                                 side="top"), thickness=10, len=0.9),
        hovertemplate=f"training image %{{y}}<br>noise level %{{x}}<br>{what}: %{{text}}<extra></extra>"))
    fig.update_layout(**_LAYOUT, height=max(260, 26 * len(rows) + 110),
                      xaxis=dict(title="noise level (timesteps): low → high", side="bottom"),
                      yaxis=dict(autorange="reversed", title=None, type="category"))
    return fig


def noise_level_cards(train, levels, class_word: str = "digit", class_names=None) -> str:
    """The strongest training image of each noise level (by `NoiseLevels.top`: centred when the levels
    are), one small card per timestep bucket, each naming its class (`class_names`: None, the
    training set's own)."""
    class_names = getattr(train, "classes", None) if class_names is None else class_names
    cards = []
    for b, label in enumerate(levels.labels()):
        i = int(levels.top(b, 1)[0])
        lab = int(train.labels[i])
        cards.append(
            f'<figure class="card" data-index="{i}" role="button" tabindex="0" title="training image #{i}">'
            f'{_img(train.images[i], 48, f"training image {i}", _range(train))}<figcaption><b>#{i}</b><br>'
            f'{f"{html.escape(_class_label(lab, class_word, class_names))}<br>" if lab >= 0 else ""}'
            f'<span class="muted">{html.escape(label)}</span>'
            '</figcaption></figure>')
    return ('<div class="cards-title">Strongest proponent at each noise level</div>'
            f'<div class="cards cards-small">{"".join(cards)}</div>')


def training_image_details(train, index: int, rows: list[dict], class_word: str = "digit") -> str:
    """One training image, large, with its class (name and label), file and caption where known,
    and its rank and score under every method (`app_support.ranks_under_methods`)."""
    lab = int(train.labels[index])
    named = _describe(train, index)
    name = named.get("class") if named.get("class") != str(lab) else None
    about = (f'<div class="muted">file: {html.escape(named["path"])}</div>' if "path" in named else "") + (
        f'<div class="muted">its caption: “{html.escape(named["caption"])}”</div>' if "caption" in named else "")
    body = []
    for r in rows:
        if r["rank"] is None:
            body.append(f'<tr><td>{html.escape(r["method"])}</td><td colspan="2" class="muted">'
                        f'{html.escape(r["why"])}</td></tr>')
            continue
        cls = "pos" if r["side"] == "proponent" else "neg"
        body.append(f'<tr><td>{html.escape(r["method"])}</td><td>{r["rank"]:,} of {r["of"]:,}</td>'
                    f'<td class="{cls}">{r["score"]:+.3g}</td></tr>')
    return (f'<div class="details"><div class="details-image">{_img(train.images[index], 160, f"training image {index}", _range(train))}'
            f'</div><div class="details-text"><div class="details-title">Training image #{index}'
            f'{f" · {html.escape(name)}" if name else ""}{f" · {class_word} {lab}" if lab >= 0 else ""}</div>{about}'
            '<div class="muted">Rank 1 is the strongest proponent of the query; the last rank its strongest opponent.</div>'
            '<table class="ranks"><thead><tr><th>method</th><th>rank</th><th>score</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></div>')


# ---------------------------------------------------------------- counterfactual

def image_pairs(pairs, caption_px: int = 96) -> str:
    """Before / after pictures side by side: pairs of (title, before, after), each picture a model
    image (C, H, W) or a PIL image."""
    items = []
    for title, before, after in pairs:
        items.append(f'<figure class="pair"><div class="pair-images">{_img(before, caption_px, "before")}'
                     f'<span class="arrow">→</span>{_img(after, caption_px, "after")}</div>'
                     f'<figcaption>{title}</figcaption></figure>')
    return f'<div class="pairs">{"".join(items)}</div>'


def counterfactual_summary(summary: dict, n_train: int | None = None, word: str = "digit") -> str:
    """The counterfactual harness's summary as Markdown: per removal size and ranking, the median
    pixel L2 with its quartiles and how often the target's class (`word`: "digit" on the digits)
    changed, where a classifier read it; then the paired comparisons."""
    cells = summary.get("cells", [])
    if not cells:
        return ""
    rankings = sorted(dict.fromkeys(c["ranking"] for c in cells), key=registry.sort_key)  # the paper's column order
    provisional = ([f"**Provisional:** {summary.get('jobs_done')} of {summary.get('jobs_planned')} retrains were "
                    "measured when this summary was written; each cell covers those only.", ""]
                   if summary.get("partial") else [])
    head = "| removed | measure | " + " | ".join(sup.method_label(r) for r in rankings) + " |"
    lines = [*provisional, head, "|" + "---|" * (len(rankings) + 2)]
    for k in sorted({c["k"] for c in cells}, reverse=True):
        by = {c["ranking"]: c for c in cells if c["k"] == k}
        share = f"{k} ({k / n_train:.0%})" if n_train else str(k)

        def row(measure, fmt):
            return f"| {share} | {measure} | " + " | ".join(fmt(by[r]) if r in by else "" for r in rankings) + " |"
        lines.append(row("median pixel L2 [p25, p75]", lambda c: f"**{c['l2']['median']:.2f}** "
                                                                 f"[{c['l2']['p25']:.2f}, {c['l2']['p75']:.2f}]"))
        if any(c.get("label_changed") is not None for c in by.values()):  # (None: no classifier read them)
            lines.append(row(f"{word} changed", lambda c: "" if c.get("label_changed") is None else
                             f"{c['label_changed']:.0%} of {c['l2']['n']}"))
        if any(c.get("removed_same_label_share") is not None for c in by.values()):
            lines.append(row(f"removed images of the target's {word}", lambda c: (
                "" if c.get("removed_same_label_share") is None else f"{c['removed_same_label_share']:.0%}")))
    paired = summary.get("paired", [])
    if paired and any("holm_p" not in p for p in paired):  # a summary written before the correction was recorded
        from dtrak_core.evaluation.counterfactual_report import holm

        paired = holm([{k: v for k, v in p.items() if k != "holm_p"} for p in paired])
    if paired:
        def p_value(v):  # None: too few targets (fewer than 6) or no differences, so no test was run
            return "–" if v is None else f"{v:.2g}"
        tests = sum(p.get("wilcoxon_p") is not None for p in paired)
        both = any(p.get("median_removed_by_both") is not None for p in paired)  # (not in older summaries)
        lines += ["", "| removed | comparison (same targets) | targets | " + ("removed by both (median) | " if both else "")
                  + f"A moves more | median L2(A) - L2(B) | Wilcoxon p | Holm-adjusted p ({tests} test"
                  f"{'' if tests == 1 else 's'}) |", "|---|---|---|---|---|---|---|" + ("---|" if both else "")]
        for p in paired:
            shared = "" if p.get("median_removed_by_both") is None else f"{p['median_removed_by_both']:g} of {p['k']}"
            lines.append(f"| {p['k']} | {sup.method_label(p['a'])} vs {sup.method_label(p['b'])} | {p.get('n', '?')} | "
                         + (f"{shared} | " if both else "") + f"{p['share_a_moves_more']:.0%} | "
                         f"{p['median_difference']:+.2f} | {p_value(p.get('wilcoxon_p'))} | {p_value(p.get('holm_p'))} |")
        if any(p.get("wilcoxon_p") is None for p in paired):
            lines += ["", "–: no test (fewer than 6 targets measured under both rankings, or no difference)."]
    control = summary.get("control")
    if control:
        lines += ["", f"Reproducibility check: retraining on the whole training set on this machine "
                      f"({control.get('threads', '?')} thread(s)) regenerates the targets within a median pixel L2 of "
                      f"{control['median_l2']:.1g} (max {control['max_l2']:.1g}) of the committed model's samples, "
                      "so the distances above come from the removed images, not from retraining noise "
                      "(bit-identical weights are not expected across thread counts)."]
    return "\n".join(lines)


def counterfactual_chart(summary: dict) -> go.Figure:
    """Per removal size and ranking, the distribution of before/after pixel L2 over the targets: a
    box (median, quartiles) with every target as a point."""
    fig = go.Figure()
    cells = summary.get("cells", [])
    for k in sorted({c["k"] for c in cells}, reverse=True):
        x, y, text = [], [], []
        for c in (c for c in cells if c["k"] == k):
            for t in c.get("per_target", []):
                x.append(sup.method_label(c["ranking"]))
                y.append(t["l2"])
                text.append(f"seed {t['seed']}: label {t['label_before']} -> {t['label_after']}")
        fig.add_box(x=x, y=y, text=text, name=f"{k} removed", boxpoints="all", jitter=0.4, pointpos=0,
                    marker=dict(size=4), hovertemplate="%{text}<br>L2 %{y:.2f}<extra></extra>")
    rankings = sorted(dict.fromkeys(c["ranking"] for c in cells), key=registry.sort_key)  # the paper's column order
    fig.update_xaxes(categoryorder="array", categoryarray=[sup.method_label(r) for r in rankings])
    fig.update_layout(**_LAYOUT, height=340, boxmode="group",
                      yaxis_title="pixel L2 before vs after")
    return fig


# ---------------------------------------------------------------- benchmarks

def lds_chart(rows: list[dict], ceiling: dict | None = None) -> go.Figure:
    """Horizontal bars of the honest-lambda LDS per method and test set, best method on top, with
    the noise ceiling (the best LDS reachable) per test set as a dashed line. `rows`:
    `app_support.lds_rows` / `table_rows`; `ceiling`: {test set: {'ceiling': ...}}."""
    fig = go.Figure()
    sets = sorted(dict.fromkeys(r["test set"] for r in rows), key=lambda s: s != "validation")
    first = sets[0] if sets else None  # methods are sorted by this test set (the validation digits when present)
    best = {r["method"]: r[sup.HONEST] for r in rows if r["test set"] == first}
    order = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: best.get(m, -1e9))  # plotly draws bottom-up
    for j, test_set in enumerate(sets):
        sub = {r["method"]: r for r in rows if r["test set"] == test_set}
        methods = [m for m in order if m in sub]
        fig.add_bar(y=methods, x=[sub[m][sup.HONEST] for m in methods], name=test_set, orientation="h",
                    marker_color=TEST_SET_COLORS.get(test_set), error_x=dict(type="data", array=[sub[m][sup.PM] for m in methods]),
                    hovertemplate="%{y}<br>LDS %{x:.1f}<extra>" + test_set + "</extra>")
        value = (ceiling or {}).get(test_set, {}).get("ceiling")
        if value is not None:
            fig.add_vline(x=value, line=dict(color=TEST_SET_COLORS.get(test_set, "#334155"), dash="dash", width=1.5),
                          annotation_text=f"ceiling ({test_set}) {value:.0f}",
                          annotation_position="top left" if j % 2 == 0 else "bottom left",
                          annotation_font_size=11)
    fig.update_layout(**_LAYOUT, barmode="group", height=max(260, 34 * len(order) * max(1, len(sets)) // 2 + 120),
                      xaxis=dict(title="LDS x 100 (higher is better)", rangemode="tozero"),
                      yaxis=dict(categoryorder="array", categoryarray=order, automargin=True))
    return fig


def _chart_columns(rows, headers) -> tuple[list, list]:
    text = [h for h in headers if all(isinstance(r.get(h), str) for r in rows)]
    numeric = [h for h in headers if all(isinstance(r.get(h), (int, float)) and not isinstance(r.get(h), bool)
                                         for r in rows)]
    return text, numeric


def chartable(rows, headers) -> bool:
    """Whether `benchmark_chart` draws this table: it has a text and a numeric column and 2+ rows."""
    text, numeric = _chart_columns(rows, headers)
    return bool(text and numeric and len(rows) >= 2)


def benchmark_chart(rows, headers, title) -> go.Figure | None:
    """A bar chart of a table's first numeric column against its first text column, if it has both."""
    if not chartable(rows, headers):
        return None
    text, numeric = _chart_columns(rows, headers)
    fig = go.Figure(go.Bar(x=[r[text[0]] for r in rows], y=[r[numeric[0]] for r in rows], marker_color="#2563eb"))
    fig.update_layout(template="plotly_white", height=280, margin=dict(l=10, r=10, t=30, b=10),
                      title=dict(text=f"{title}: {numeric[0]}", font=dict(size=13)))
    return fig
