"""`ensemble report RUN`: what a run found, readable in a minute.

Writes RUN/report.md (Markdown, figures as PNG files in RUN/report/) and RUN/report.html (one
static file with the same figures embedded: it opens offline, without a server). Everything
comes from what the run directory already holds, so a report can be made during a run, after
it, or on another machine; no data set and no Ray are needed.
"""
from __future__ import annotations

import base64
import html
import re
import shutil
import time

import yaml

from ensemble import figures
from ensemble.config import RunConfig, to_dict
from ensemble.data import CLASS_NAMES
from ensemble.errors import ConfigError
from ensemble.rundir import RunDir, specialists_section, summary_table, timings_section

FIGURES = "report"  # RUN/report/<figure>.png


def class_labels(cfg: RunConfig, classes: int) -> list[str]:
    known = () if cfg.data.source else CLASS_NAMES.get(cfg.data.name, ())
    return list(known)[:classes] or [str(c) for c in range(classes)]


def temperature_grid(cfg: RunConfig, models: dict[str, dict]) -> dict | None:
    """The students that differ only in width and temperature (the largest such group with at
    least two temperatures): {(width, T): (name, val errors, test errors)}, else None."""
    groups: dict[str, dict] = {}
    for name, scfg in cfg.students.items():
        summary = (models.get(f"student-{name}") or {}).get("summary") or {}
        if not scfg.uses_teacher or summary.get("val_errors") is None:
            continue
        recipe = to_dict(scfg)
        for key in ("temperature", "resources", "paper"):
            recipe.pop(key)
        recipe["model"].pop("hidden")
        cells = groups.setdefault(repr(sorted(recipe.items())), {})
        cells.setdefault((scfg.model.hidden[0], scfg.temperature),
                         (f"student-{name}", summary["val_errors"], summary["test_errors"]))
    grids = [g for g in groups.values() if len({t for _, t in g}) >= 2]
    return max(grids, key=len) if grids else None


def headline(models: dict[str, dict], ensemble: dict | None) -> list[str]:
    """Bullets: the best model of each role by validation, and what the specialists changed."""
    lines = []
    for role in ("generalist", "specialist", "student"):
        done = {n: m["summary"] for n, m in models.items() if m.get("role") == role and
                (m.get("summary") or {}).get("val_errors") is not None}
        if not done or role == "specialist":
            continue
        name = min(done, key=lambda n: (done[n]["val_errors"], n))
        s, size = done[name], models[name].get("test_size") or 0
        rate = f" ({100 * s['test_errors'] / size:.2f} %)" if size else ""
        lines.append(f"- best {role} by validation: **{name}**, {s['test_errors']:,} test "
                     f"errors{rate}, {s['parameters']:,} parameters")
    if ensemble:
        t = ensemble["test"]
        lines.append(f"- specialists: the generalists' {t['generalist_errors']:,} test errors "
                     f"became {t['ensemble_errors']:,} with the specialists")
    failed = [n for n, m in models.items() if m.get("status") == "failed"]
    unfinished = [n for n, m in models.items() if m.get("status") == "training"]
    if failed:
        lines.append(f"- failed: {', '.join(failed)} (reasons in the table)")
    if unfinished:
        lines.append(f"- not finished yet: {', '.join(unfinished)}")
    return lines


def grid_table(grid: dict) -> list[str]:
    """Markdown lines: the students' test errors (validation errors in brackets) by width and
    temperature, the best T per width by validation in bold."""
    widths, temps = sorted({w for w, _ in grid}), sorted({t for _, t in grid})
    md = ["", "## Students: temperature x width", "",
          "Test errors (validation errors in brackets); the best T per width by validation "
          "in bold.", "",
          "| width | " + " | ".join(f"T={t:g}" for t in temps) + " |",
          "|---:|" + "---:|" * len(temps)]
    for w in widths:
        best = min((grid[(w, t)][1], t) for t in temps if (w, t) in grid)[1]
        cells = []
        for t in temps:
            if (w, t) not in grid:
                cells.append("–")
                continue
            _, val, test = grid[(w, t)]
            cell = f"{test} ({val})"
            cells.append(f"**{cell}**" if t == best else cell)
        md.append(f"| {w} | " + " | ".join(cells) + " |")
    return md


def build(run: RunDir) -> tuple[str, dict[str, bytes]]:
    """The report's Markdown and its figures {file name: PNG}."""
    cfg = run.load_config()
    metrics = run.read_json("metrics.json")
    if not metrics or not metrics.get("models"):
        raise ConfigError(f"{run.location} has no results yet (metrics.json is written after "
                          "the first epoch)")
    models, timings = metrics["models"], metrics.get("timings")
    subsets, ensemble = run.read_json("subsets.json"), run.read_json("ensemble.json")
    pngs: dict[str, bytes] = {}

    def figure(file: str, caption: str, png: bytes) -> str:
        pngs[file] = png
        return f"![{caption}]({FIGURES}/{file})"

    done = [m for m in models.values() if m.get("summary")]
    classes = next((len(m["summary"]["test_confusion"]) for m in done
                    if m["role"] != "specialist" and m["summary"].get("test_confusion")), 0)
    labels = class_labels(cfg, classes or 10)
    md = [f"# {cfg.name}", "",
          f"Run directory `{run.location}`; report made {time.strftime('%Y-%m-%d %H:%M')}"
          + (f"; the last session took {timings['total']:.0f} s" if timings else "") + ".", ""]
    md += headline(models, ensemble) + ["", "## Models", ""]
    md += summary_table(cfg.name, models).split("\n", 2)[2].splitlines()
    histories = {n: m["history"] for n, m in models.items() if m.get("history")}
    if histories:
        md += ["", "## Learning curves", "",
               figure("curves.png", "Validation errors and training loss per epoch",
                      figures.curves(histories))]
    if subsets:
        md += specialists_section(subsets, ensemble).splitlines()
        md += ["", figure("covariance.png", "Covariance of the generalists' predictions",
                          figures.covariance(subsets["covariance"], labels,
                                             f"Covariance of predicted probabilities "
                                             f"({subsets['covariance_on']})"))]
        if subsets["subsets"]:
            md += ["", figure("subsets.png", "Class subsets",
                              figures.subsets(subsets["subsets"], labels))]
    confusions = [(n, m["summary"]["test_confusion"]) for n, m in models.items()
                  if m["role"] != "specialist" and (m.get("summary") or {}).get("test_confusion")]
    if ensemble and "ensemble_confusion" in ensemble["test"]:
        confusions.append(("generalists + specialists", ensemble["test"]["ensemble_confusion"]))
    if confusions:
        md += ["", "## Confusion matrices", "",
               "On the test set, each model at its best epoch by validation; rows are the true "
               "class, columns the prediction.", ""]
        for name, matrix in confusions:
            file = "confusion-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name) + ".png"
            md += [figure(file, f"Confusion matrix of {name}",
                          figures.confusion(matrix, labels, name)), ""]
    grid = temperature_grid(cfg, models)
    if grid:
        md += grid_table(grid) + ["", figure(
            "temperature-width.png", "Validation errors by temperature and width",
            figures.temperature_grid({k: v[1] for k, v in grid.items()}, "validation errors"))]
    md += timings_section(timings, models).splitlines()
    md += ["", "## Config", "", "```yaml",
           yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```"]
    return "\n".join(md) + "\n", pngs


def write(run: RunDir) -> list[str]:
    """Write report.md, report.html and the figures into `run`; return the files written."""
    text, pngs = build(run)
    folder = run.path / FIGURES
    shutil.rmtree(folder, ignore_errors=True)  # figures of an earlier report may be gone now
    folder.mkdir(parents=True)
    for file, png in pngs.items():
        (folder / file).write_bytes(png)
    (run.path / "report.md").write_text(text)
    (run.path / "report.html").write_text(to_html(text, pngs))
    return ["report.md", "report.html"] + [f"{FIGURES}/{f}" for f in pngs]


# ---------------------------------------------------------------- Markdown -> one HTML file ----
STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f4f4f4}td{text-align:right}td:first-child{text-align:left}img{max-width:100%;
display:block;margin:1em 0}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:13px}
img[alt^="Confusion"]{display:inline-block;width:49%;margin:0.5em 0}h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}"""


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def to_html(markdown: str, pngs: dict[str, bytes]) -> str:
    """The Markdown this module writes (headings, paragraphs, lists, tables, images, one code
    block) as a standalone page; images become data: URIs, so the page needs no other file."""
    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = lines.index("```", i + 1)
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:end])) + "</pre>")
            i = end + 1
            continue
        heading = re.match(r"(#+) (.*)", line)
        image = re.fullmatch(r"!\[(.*)\]\(" + FIGURES + r"/(.+)\)", line)
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            data = base64.b64encode(pngs[image.group(2)]).decode()
            out.append(f'<img alt="{html.escape(image.group(1))}" '
                       f'src="data:image/png;base64,{data}">')
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-:")]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                                 for r in body) + "</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            para = [line]
            while i + 1 < len(lines) and lines[i + 1].strip() and \
                    not re.match(r"(#|\||- |!\[|```)", lines[i + 1]):
                i += 1
                para.append(lines[i])
            out.append(f"<p>{_inline(' '.join(para))}</p>")
        i += 1
    title = html.escape(markdown.splitlines()[0].lstrip("# "))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(out) + "\n</body></html>\n")
