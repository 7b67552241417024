"""report.html: the comparison as one self-contained page (inline CSS, PNG plots as base64 data URIs).

The page holds the same tables as report.md and the terminal (one `TableData` list renders all three), so
the numbers cannot drift between them; jinja2 autoescapes every cell. Nothing is fetched when it opens.
"""

from __future__ import annotations

import base64

import jinja2
import markupsafe

from lmforge.report.rows import Comparison

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f3f7; }
tr.baseline td { background: #f7f7f7; }
td.bad { color: #a33; } td.good { color: #275; }
p.note { color: #666; font-size: 0.85em; margin-top: 0; }
figure { display: inline-block; margin: 1em 1em 0 0; }
img { max-width: 100%; border: 1px solid #eee; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p>Baseline: <b>{{ baseline }}</b>. {{ rows }} models, tasks: {{ tasks }}.
Every number comes from the run.json of the folders listed at the end; costs are measured, not estimated.</p>
{% for table in tables %}
<h2>{{ table.title }}</h2>
<table>
<thead><tr>{% for column in table.columns %}<th>{{ column }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in table.rows %}<tr{% if row[0] == baseline %} class="baseline"{% endif %}>
{% for cell in row %}<td{{ verdict_class(cell) }}>{{ cell }}</td>{% endfor %}
</tr>
{% endfor %}
</tbody>
</table>
{% if table.note %}<p class="note">{{ table.note }}</p>{% endif %}
{% endfor %}
<h2>plots</h2>
{% for name, data in images %}
<figure><img alt="{{ name }}" src="data:image/png;base64,{{ data }}">
<figcaption>{{ name | replace('_', ' ') }}</figcaption></figure>
{% endfor %}
<h2>sources</h2>
<ul>
{% for row in sources %}<li>{{ row.label }}: {{ row.sources | join(', ') }}</li>
{% endfor %}
</ul>
</body>
</html>
"""


def render(comparison: Comparison, images: dict[str, bytes]) -> str:
    """The report page, with every image inlined."""
    template = jinja2.Environment(autoescape=True).from_string(_TEMPLATE)
    return template.render(
        title=comparison.title,
        baseline=comparison.baseline,
        rows=len(comparison.rows),
        tasks=", ".join(comparison.tasks),
        tables=comparison.tables,
        images=[(name, base64.b64encode(png).decode("ascii")) for name, png in images.items()],
        sources=comparison.rows,
        verdict_class=_verdict_class,
    )


def _verdict_class(cell: str) -> markupsafe.Markup:
    """Colour the verdict cells: green when a method paid off, red when it did not."""
    if cell.startswith("paid off"):
        return markupsafe.Markup(' class="good"')
    if cell.startswith("did not pay off"):
        return markupsafe.Markup(' class="bad"')
    return markupsafe.Markup("")
