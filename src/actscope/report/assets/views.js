// actscope report: the logit-lens grid and the attention viewer (see report/views.py), built from
// the run's lens, attention and attention_tokens tables in the page's JSON. Run text reaches the
// DOM through textContent only: in HTML each value has its own dir="auto" element, in SVG and
// tooltips it is stripped of bidi controls and isolated (plainIsolated).
(function () {
  "use strict";
  var kit = window.actscopeKit;
  if (!kit) return;
  var el = kit.el, userEl = kit.userEl, plainIsolated = kit.plainIsolated, data = kit.data;
  var SVG = "http://www.w3.org/2000/svg";

  function columns(spec) {
    var out = {};
    Object.keys(spec.columns).forEach(function (name) { out[name] = kit.decode(spec.columns[name], spec.n); });
    return out;
  }

  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, String(attrs[key])); });
    return node;
  }

  // -- logit lens: layers × positions, the top token of each cell shaded by its probability ----
  function lensGrid() {
    var slot = document.getElementById("lens-grid"), spec = data.tables.lens;
    if (!slot || !spec) return;
    var t = columns(spec), kinds = [];
    t.kind.forEach(function (k) { if (kinds.indexOf(k) < 0) kinds.push(k); });
    function render(kind) {
      var cells = {}, inputs = [], layers = [];
      for (var i = 0; i < spec.n; i++) {
        if (t.kind[i] !== kind) continue;
        var key = t.layer[i] + ":" + t.position[i];
        (cells[key] = cells[key] || []).push(i);
        inputs[t.position[i]] = t.input[i];
        if (layers.indexOf(t.layer[i]) < 0) layers.push(t.layer[i]);
      }
      layers.sort(function (a, b) { return a - b; });
      var grid = el("table", "lens"), head = el("tr");
      head.appendChild(el("th", "", "layer"));
      inputs.forEach(function (text) { head.appendChild(userEl("th", "input", text)); });
      grid.appendChild(el("thead")).appendChild(head);
      var body = grid.appendChild(el("tbody"));
      layers.forEach(function (layer) {
        var tr = el("tr");
        tr.appendChild(el("td", "layer", String(layer)));
        inputs.forEach(function (_, position) {
          var rows = (cells[layer + ":" + position] || []).slice().sort(function (a, b) { return t.rank[a] - t.rank[b]; });
          var top = rows[0], td = userEl("td", "cell", top === undefined ? "" : t.token[top]);
          if (top !== undefined) {
            td.style.backgroundColor = "rgba(59, 111, 182, " + (0.06 + 0.8 * (t.prob[top] || 0)).toFixed(3) + ")";
            td.title = rows.map(function (r) { return plainIsolated(t.token[r]) + " " + t.prob[r]; }).join("\n") +
              (t.kl ? "\nKL from the final distribution: " + t.kl[top] : "");
          }
          tr.appendChild(td);
        });
        body.appendChild(tr);
      });
      slot.replaceChildren(grid);
      slot.dataset.kind = kind;
    }
    var picker = document.getElementById("lens-kind");
    if (picker) picker.addEventListener("change", function () { render(kinds[Number(picker.value)]); });
    render(kinds[0]);
  }

  // -- attention viewer: a head picker, one query × key grid, hover read-out, the sink marked ----
  function attentionViewer() {
    var slot = document.getElementById("attention-grid"), spec = data.tables.attention;
    var picker = document.getElementById("attention-head"), readout = document.getElementById("attention-readout");
    if (!slot || !spec || !picker) return;
    var t = columns(spec), tokens = data.tables.attention_tokens ? columns(data.tables.attention_tokens).token : null;
    var size = 0, heads = [], index = {};
    for (var i = 0; i < spec.n; i++) size = Math.max(size, t.query[i] + 1, t.key[i] + 1);
    for (var r = 0; r < spec.n; r++) {
      var name = t.site[r] + "\u0000" + t.head[r];
      if (!(name in index)) {
        index[name] = heads.length;
        heads.push({ site: t.site[r], head: t.head[r], weights: new Float32Array(size * size) });
      }
      heads[index[name]].weights[t.query[r] * size + t.key[r]] = t.weight[r];
    }
    heads.forEach(function (h, k) {
      var option = el("option", "", plainIsolated(h.site) + " \u00b7 head " + h.head);
      option.value = String(k);
      picker.appendChild(option);
    });
    function label(position) { return tokens && tokens[position] !== undefined ? tokens[position] : String(position); }
    function say(parts) {  // our words as text, run text each in its own isolated element
      readout.replaceChildren.apply(readout, parts.map(function (part) {
        return typeof part === "string" ? document.createTextNode(part) : userEl("span", "tok", part.text);
      }));
    }
    function render(k) {
      var h = heads[k], cell = Math.max(8, Math.min(26, Math.floor(480 / size))), margin = 110;
      var width = margin + size * cell + 10, height = margin + size * cell + 10;
      var svg = svgEl("svg", { "class": "chart attention", width: width, height: height, viewBox: "0 0 " + width + " " + height });
      var labels = svgEl("g", { "class": "tokens" });
      for (var p = 0; p < size; p++) {
        var left = svgEl("text", { x: margin - 4, y: margin + p * cell + cell * 0.7, "text-anchor": "end" });
        left.textContent = plainIsolated(label(p));
        var top = svgEl("text", { x: 0, y: 0, transform: "translate(" + (margin + p * cell + cell * 0.7) + "," + (margin - 4) + ") rotate(-60)" });
        top.textContent = plainIsolated(label(p));
        labels.appendChild(left);
        labels.appendChild(top);
      }
      svg.appendChild(labels);
      var sink = 0;
      for (var q = 0; q < size; q++) {
        sink += h.weights[q * size];
        for (var key = 0; key < size; key++) {
          var w = h.weights[q * size + key];
          var rect = svgEl("rect", { "class": "cell", x: margin + key * cell, y: margin + q * cell, width: cell - 1, height: cell - 1,
                                     fill: "rgba(59, 111, 182, " + Math.min(1, 0.03 + 0.97 * w).toFixed(3) + ")" });
          rect.dataset.query = String(q);
          rect.dataset.key = String(key);
          svg.appendChild(rect);
        }
      }
      svg.appendChild(svgEl("rect", { "class": "sink", x: margin - 1, y: margin - 1, width: cell + 1, height: size * cell + 1 }));
      var tag = svgEl("text", { x: margin + cell / 2, y: margin + size * cell + 9, "text-anchor": "middle", "class": "axis" });
      tag.textContent = "sink";
      svg.appendChild(tag);
      var mean = sink / size;
      var idle = ["attention on the first token (the sink column): " + mean.toFixed(3) + " on average over queries; hover a cell"];
      svg.addEventListener("mouseover", function (event) {
        var target = event.target;
        if (!target.dataset || target.dataset.query === undefined) return;
        var qi = Number(target.dataset.query), ki = Number(target.dataset.key);
        say(["query " + qi + " ", { text: label(qi) }, " \u2192 key " + ki + " ", { text: label(ki) },
             ": " + Number(h.weights[qi * size + ki].toPrecision(3))]);
      });
      svg.addEventListener("mouseleave", function () { say(idle); });
      slot.replaceChildren(svg);
      slot.dataset.head = String(k);
      say(idle);
    }
    picker.addEventListener("change", function () { render(Number(picker.value)); });
    render(0);
  }

  lensGrid();
  attentionViewer();
})();
