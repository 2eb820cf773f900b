"""TODO"""

from __future__ import annotations

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 2em 3em;color:#222}
h1{margin-top:.8em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
nav a{margin-right:1em}
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{border:1px solid #ddd;border-radius:6px;padding:.5em 1em}
.card b{display:block;font-size:1.4em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}
table.sortable th{cursor:pointer}table.sortable th.asc:after{content:" \\25B2"}table.sortable th.desc:after{content:" \\25BC"}
.scroll{max-height:32em;overflow:auto}
svg.chart text{font-size:11px}
details{margin:.3em 0}summary{cursor:pointer}
.sheet{display:flex;flex-wrap:wrap;gap:6px}.sheet figure{margin:0;width:160px;font-size:11px}
.sheet img,.sheet .missing{width:160px;height:120px;object-fit:contain;background:#eee;display:block}
.sheet .missing{display:flex;align-items:center;justify-content:center;color:#900}
.model-picture img{max-width:560px}.model-picture{display:inline-block;margin:.5em}
.legend span{display:inline-block;margin-right:1em}.legend i{display:inline-block;width:10px;height:10px;margin-right:3px}
"""


SCRIPT = r"""
(function () {
  function value(cell) { var v = cell.getAttribute('data-v'); return v === null ? cell.textContent : parseFloat(v); }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th) {
      th.addEventListener('click', function () {
        var col = th.cellIndex, asc = !th.classList.contains('asc');
        table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
        th.classList.add(asc ? 'asc' : 'desc');
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var a = value(r1.cells[col]), b = value(r2.cells[col]);
          if (typeof a === 'number' && typeof b === 'number') { return asc ? a - b : b - a; }
          return asc ? String(a).localeCompare(String(b)) : String(b).localeCompare(String(a));
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var data = JSON.parse(document.getElementById('timeline-data').textContent);
  var NS = 'http://www.w3.org/2000/svg';
  function draw(details) {
    var episode = details.getAttribute('data-episode'), info = data.episodes[episode];
    if (!info || details.querySelector('svg')) { return; }
    var lanes = data.lanes, lane = 18, left = 170, width = 1100, end = Math.max(info.end, 1e-9);
    var svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('class', 'chart timeline');
    svg.setAttribute('width', width); svg.setAttribute('height', lanes.length * lane + 24);
    lanes.forEach(function (name, i) {
      var t = document.createElementNS(NS, 'text');
      t.setAttribute('x', left - 6); t.setAttribute('y', i * lane + 13); t.setAttribute('text-anchor', 'end');
      t.textContent = name; svg.appendChild(t);
    });
    info.segments.forEach(function (s) {
      var r = document.createElementNS(NS, 'rect');
      r.setAttribute('x', left + (width - left - 10) * s[1] / end);
      r.setAttribute('width', Math.max(1, (width - left - 10) * s[2] / end));
      r.setAttribute('y', s[0] * lane + 2); r.setAttribute('height', lane - 4);
      r.setAttribute('fill', data.colors[lanes[s[0]]] || '#888');
      var title = document.createElementNS(NS, 'title');
      title.textContent = lanes[s[0]] + ' ' + s[1].toFixed(1) + '-' + (s[1] + s[2]).toFixed(1) + ' ' + info.unit;
      r.appendChild(title); svg.appendChild(r);
    });
    (info.cuts || []).forEach(function (c) {  // shot boundaries, behind nothing: thin grey lines across every lane
      var l = document.createElementNS(NS, 'line'), x = left + (width - left - 10) * c / end;
      l.setAttribute('x1', x); l.setAttribute('x2', x); l.setAttribute('y1', 0); l.setAttribute('y2', lanes.length * lane);
      l.setAttribute('class', 'cut'); l.setAttribute('stroke', '#bbb'); l.setAttribute('stroke-width', '0.5');
      svg.insertBefore(l, svg.firstChild);
    });
    var axis = document.createElementNS(NS, 'text');
    axis.setAttribute('x', left); axis.setAttribute('y', lanes.length * lane + 18);
    axis.textContent = '0 - ' + info.end.toFixed(1) + ' ' + info.unit;
    svg.appendChild(axis);
    details.appendChild(svg);
  }
  document.querySelectorAll('details.timeline').forEach(function (d) {
    d.addEventListener('toggle', function () { if (d.open) { draw(d); } });
    if (d.open) { draw(d); }
  });
  document.getElementById('open-all').addEventListener('click', function () {
    document.querySelectorAll('details.timeline').forEach(function (d) { d.open = true; draw(d); });
  });
})();
"""
