// actscope report: the unit page's parts beyond its statistics (see report/units.py): the unit's
// activation on every token around each top example (shaded, the value on hover), examples from
// quantile bins of the tokens it fires on, its histogram, and the units it co-fires with.
// Run text reaches the DOM through textContent only, each value in its own dir="auto" element.
(function () {
  "use strict";
  var kit = window.actscopeKit;
  if (!kit || !kit.data.neurons) return;
  var el = kit.el, userEl = kit.userEl, plainIsolated = kit.plainIsolated, fmt = kit.fmt;
  var ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  var LEVELS = 2047, SVG = "http://www.w3.org/2000/svg";
  var spec = kit.data.neurons;
  var starts = {};  // per part: the first index of each neuron row's entries

  function offsets(part, name) {
    if (!starts[name]) {
      var n = spec.n, counts = kit.decode(part.cnt, n), out = new Int32Array(n + 1);
      for (var i = 0; i < n; i++) out[i + 1] = out[i] + counts[i];
      starts[name] = out;
    }
    return starts[name];
  }

  function short(value) { return Number(value.toPrecision(3)); }

  // A shade for a value relative to the unit's peak |a|: orange above zero, blue below.
  function shade(node, value, peak) {
    var strength = peak > 0 ? Math.min(1, Math.abs(value) / peak) : 0;
    var rgb = value >= 0 ? "224, 123, 57" : "59, 111, 182";
    node.style.backgroundColor = "rgba(" + rgb + ", " + (0.06 + 0.84 * strength).toFixed(3) + ")";
  }

  // Token texts by document position (from the run's tokens table), or null.
  var texts = null;
  function tokenText(windows, doc, pos) {
    var tok = windows.tok;
    if (!tok) return null;
    if (!texts) {
      texts = {};
      tok.doc.forEach(function (d, i) { texts[d] = i; });
    }
    var at = texts[doc];
    if (at === undefined) return null;
    var id = tok.ids[at][pos - tok.first[at]];
    return id === undefined || id < 0 ? null : tok.strings[id];
  }

  // The strip of one example: every token of its window, shaded by the unit's activation there.
  function windowStrip(examples, j, row) {
    var windows = examples.windows, code = windows.win[j];
    if (!code) return null;
    var ctx = examples.ctx[j], doc = examples.contexts.doc[ctx], pos = examples.contexts.pos[ctx];
    var peak = windows.peak[row] || 0, first = pos + windows.ws[j];
    var strip = el("div", "window");
    strip.title = "";  // each token says its own value
    for (var i = 0; 2 * i < code.length; i++) {
      var c = ALPHABET.indexOf(code.charAt(2 * i)) * 64 + ALPHABET.indexOf(code.charAt(2 * i + 1));
      var at = first + i, text = tokenText(windows, doc, at);
      var token = userEl("span", at === pos ? "wt own" : "wt", text === null ? "\u00b7" : text);
      if (c > 0) {
        var value = (c - LEVELS - 1) / LEVELS * peak;
        shade(token, value, peak);
        token.dataset.value = String(short(value));
        token.title = (text === null ? "pos " + at : plainIsolated(text)) + ": a = " + short(value);
      } else {
        token.title = "no value";
      }
      strip.appendChild(token);
    }
    return strip;
  }

  function histogram(row, frac) {
    var hist = spec.hist;
    if (!hist || !hist.bins) return [];
    var n = kit.decode(hist.n, spec.n)[row], top = hist.hi[row];
    if (!n || !top) return [];
    var counts = hist.counts.slice(row * hist.bins, (row + 1) * hist.bins);
    var most = Math.max.apply(null, counts) || 1;
    var width = 360, height = 110, pad = 18, bar = (width - 2 * pad) / hist.bins;
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "chart unit-hist");
    svg.setAttribute("viewBox", "0 0 " + width + " " + (height + 30));
    svg.setAttribute("width", String(width));
    svg.setAttribute("height", String(height + 30));
    counts.forEach(function (count, b) {
      var h = (height - 10) * count / most;
      var rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", (pad + b * bar + 1).toFixed(1));
      rect.setAttribute("y", (height - h).toFixed(1));
      rect.setAttribute("width", (bar - 2).toFixed(1));
      rect.setAttribute("height", h.toFixed(1));
      rect.setAttribute("class", "bar");
      var title = document.createElementNS(SVG, "title");
      var lo = short(top * b / hist.bins), hi = short(top * (b + 1) / hist.bins);
      var share = frac === null || frac === undefined ? "" : " (about " + short(100 * count / n * frac) + " % of all tokens)";
      title.textContent = lo + " \u2013 " + hi + ": " + count + " of " + n + " sampled" + share;
      rect.appendChild(title);
      svg.appendChild(rect);
    });
    [[pad, "0"], [width - pad, String(short(top))]].forEach(function (tick) {
      var label = document.createElementNS(SVG, "text");
      label.setAttribute("x", String(tick[0]));
      label.setAttribute("y", String(height + 14));
      label.setAttribute("class", "axis");
      label.setAttribute("text-anchor", tick[0] === pad ? "start" : "end");
      label.textContent = tick[1];
      svg.appendChild(label);
    });
    var note = el("p", "note", "Distribution of a > 0, from a uniform sample of " + n + " of the tokens it fires on" +
      (frac === null || frac === undefined ? "" : "; it fires (a > 0) on " + short(100 * frac) + " % of all tokens") + ".");
    return [el("h4", "", "Activation histogram"), svg, note];
  }

  function samples(row) {
    var part = spec.samples;
    if (!part) return [];
    var at = offsets(part, "samples"), start = at[row], stop = at[row + 1];
    if (start === stop) return [];
    var box = el("div", "samples-box"), contexts = part.contexts, bins = part.bins, list = null, current = -1;
    box.appendChild(el("h4", "", "Examples across its distribution (quantile bins of the tokens it fires on)"));
    for (var i = start; i < stop; i++) {
      if (part.bin[i] !== current) {
        current = part.bin[i];
        box.appendChild(el("h5", "", "quantile " + Math.round(100 * current / bins) + "\u2013" + Math.round(100 * (current + 1) / bins) + " %"));
        list = box.appendChild(el("ul", "samples"));
      }
      var ctx = part.ctx[i], item = el("li", "sample");
      item.appendChild(userEl("span", "ctx left", contexts.left[ctx] + " "));
      var token = item.appendChild(userEl("span", "tok", contexts.token[ctx] || (spec.examples && spec.examples.uris ? "image " + contexts.doc[ctx] : "(no text)")));
      if (maxima) shade(token, part.val[i] || 0, maxima[row] || 0);  // relative to the unit's largest value
      item.appendChild(userEl("span", "ctx right", " " + contexts.right[ctx]));
      item.appendChild(el("span", "meta", "a = " + fmt(part.val[i]) + " \u00b7 doc " + contexts.doc[ctx] + " \u00b7 pos " + contexts.pos[ctx]));
      list.appendChild(item);
    }
    return [box];
  }

  function cofiring(row, show) {
    var part = spec.cofire;
    if (!part) return [];
    var at = offsets(part, "cofire"), start = at[row], stop = at[row + 1];
    if (start === stop) return [];
    var units = spec.columns.unit ? kit.decode(spec.columns.unit, spec.n) : null;
    var list = el("div", "partners");
    for (var i = start; i < stop; i++) {
      var other = part.row[i], button = el("button", "partner");
      button.type = "button";
      button.appendChild(document.createTextNode("unit " + (units ? units[other] : other)));
      button.appendChild(el("span", "meta", "J = " + fmt(part.j[i]) + " \u00b7 both fire on " + part.shared[i] + " of " + part.tokens));
      button.addEventListener("click", show.bind(null, other));
      list.appendChild(button);
    }
    return [el("h4", "", "Co-fires most with (Jaccard index of the sampled tokens each fires on)"), list];
  }

  var fracs = null, maxima = null;
  kit.units = {
    window: windowStrip,
    before: function (neurons, row) {
      if (fracs === null) fracs = neurons.columns.frac_pos ? kit.decode(neurons.columns.frac_pos, neurons.n) : [];
      if (maxima === null) maxima = neurons.columns.max ? kit.decode(neurons.columns.max, neurons.n) : [];
      return histogram(row, fracs[row]);
    },
    after: function (neurons, row, show) { return samples(row).concat(cofiring(row, show)); }
  };
})();
