// actscope report: sortable paginated tables, criterion pickers and the neuron browser.
// Every value from the run reaches the DOM through textContent (never innerHTML), so text from
// the data set is always shown as text. Every such value also gets an element of its own with
// dir="auto" (report.css isolates it), so bidi controls in it (U+202E ...) cannot reorder the
// page's own words or the next value; plain-text tooltips drop the controls (see bidi.py).
(function () {
  "use strict";
  var TABLE_PAGE = 20, NEURON_PAGE = 50;  // rows per page: the DOM never holds more
  var data = JSON.parse(document.getElementById("actscope-data").textContent);

  function decode(column, n) {
    if (Object.prototype.hasOwnProperty.call(column, "c")) {
      var filled = new Array(n);
      for (var i = 0; i < n; i++) filled[i] = column.c;
      return filled;
    }
    if (column.s) {  // counting runs: 0..a-1, 0..b-1, ...
      var counted = [];
      column.s.forEach(function (length) { for (var j = 0; j < length; j++) counted.push(j); });
      return counted;
    }
    if (column.t === "cat") {
      var dict = column.d;
      return column.v.map(function (code) { return dict[code]; });
    }
    return column.v;
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // A value from the run: its own element, its direction taken from its own first letter.
  function userEl(tag, className, text) {
    var node = el(tag, className, text);
    node.dir = "auto";
    return node;
  }

  var CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
  function plainIsolated(text) {  // for a tooltip, which cannot hold an element: FSI ... PDI
    return "\u2068" + String(text).replace(CONTROLS, "") + "\u2069";
  }

  function fmt(value, column) {
    if (value === null || value === undefined) return "–";
    if (column && column.bool) return value ? "yes" : "no";
    if (typeof value === "number") return String(value);  // already rounded to 4 digits in Python
    return String(value);
  }

  function decodeTable(spec) {
    var columns = [];
    Object.keys(spec.columns).forEach(function (name) {
      var column = spec.columns[name];
      columns.push({ name: name, text: column.t === "cat", bool: column.t === "bool", values: decode(column, spec.n) });
    });
    return { n: spec.n, columns: columns };
  }

  function compare(values, direction) {
    return function (a, b) {
      var x = values[a], y = values[b];
      if (x === y) return a - b;
      if (x === null || x === undefined) return 1;   // missing values last in both directions
      if (y === null || y === undefined) return -1;
      if (typeof x === "number" && typeof y === "number") return direction * (x - y);
      return direction * String(x).localeCompare(String(y));
    };
  }

  // A table over decoded columns: click a header to sort (again to reverse), 100 rows a page.
  function SortableTable(container, table, pageSize, onRow) {
    this.container = container;
    this.pageSize = pageSize;
    this.table = table;
    this.onRow = onRow || null;
    this.rows = null;
    this.sortBy = -1;
    this.direction = 1;
    this.page = 0;
    this.selected = -1;
    this.setRows(null);
  }

  SortableTable.prototype.setRows = function (rows) {
    if (rows === null) {
      rows = new Array(this.table.n);
      for (var i = 0; i < this.table.n; i++) rows[i] = i;
    }
    this.rows = rows;
    this.page = 0;
    if (this.sortBy >= 0) this.rows.sort(compare(this.table.columns[this.sortBy].values, this.direction));
    this.render();
  };

  SortableTable.prototype.sort = function (index) {
    this.direction = this.sortBy === index ? -this.direction : (this.table.columns[index].text ? 1 : -1);
    this.sortBy = index;
    this.rows.sort(compare(this.table.columns[index].values, this.direction));
    this.page = 0;
    this.render();
  };

  SortableTable.prototype.render = function () {
    var self = this, columns = this.table.columns;
    var PAGE = this.pageSize, pages = Math.max(1, Math.ceil(this.rows.length / PAGE));
    this.page = Math.min(this.page, pages - 1);
    var start = this.page * PAGE, stop = Math.min(this.rows.length, start + PAGE);
    var grid = el("table", "data");
    var head = el("tr");
    columns.forEach(function (column, index) {
      var arrow = self.sortBy === index ? (self.direction > 0 ? " \u25b2" : " \u25bc") : "";
      var th = el("th", column.text ? "text" : "");
      th.appendChild(userEl("span", "name", column.name));
      if (arrow) th.appendChild(document.createTextNode(arrow));
      th.title = "sort by " + plainIsolated(column.name);
      th.addEventListener("click", function () { self.sort(index); });
      head.appendChild(th);
    });
    grid.appendChild(el("thead")).appendChild(head);
    var body = grid.appendChild(el("tbody"));
    for (var r = start; r < stop; r++) {
      var row = this.rows[r], tr = el("tr", this.onRow ? "clickable" : "");
      if (row === this.selected) tr.className += " selected";
      tr.dataset.row = String(row);
      for (var c = 0; c < columns.length; c++) tr.appendChild(cell("td", columns[c], row));
      if (this.onRow) tr.addEventListener("click", this.onRow.bind(null, row));
      body.appendChild(tr);
    }
    var pager = el("div", "pager");
    var first = el("button", "", "\u00ab first"), prev = el("button", "", "\u2039 prev");
    var next = el("button", "", "next \u203a"), last = el("button", "", "last \u00bb");
    first.disabled = prev.disabled = this.page === 0;
    next.disabled = last.disabled = this.page >= pages - 1;
    first.addEventListener("click", function () { self.page = 0; self.render(); });
    prev.addEventListener("click", function () { self.page -= 1; self.render(); });
    next.addEventListener("click", function () { self.page += 1; self.render(); });
    last.addEventListener("click", function () { self.page = pages - 1; self.render(); });
    [first, prev, next, last].forEach(function (b) { pager.appendChild(b); });
    pager.appendChild(el("span", "", this.rows.length ? "rows " + (start + 1) + "\u2013" + stop + " of " + this.rows.length +
      " \u00b7 page " + (this.page + 1) + " of " + pages : "no rows"));
    var scroll = el("div", "scroll");
    scroll.appendChild(grid);
    this.container.replaceChildren(pager, scroll);
  };

  // A table cell or card value: text columns hold the run's strings, so they are isolated.
  function cell(tag, column, row) {
    var make = column.text ? userEl : el;
    return make(tag, column.text ? "text" : "", fmt(column.values[row], column));
  }

  // Criterion pickers: show the panel of the chosen criterion, hide the others.
  document.querySelectorAll("select.crit-select").forEach(function (select) {
    select.addEventListener("change", function () {
      document.querySelectorAll('.crit[data-group="' + select.dataset.group + '"]').forEach(function (panel) {
        panel.hidden = panel.dataset.key !== select.value;
      });
    });
  });

  document.querySelectorAll("div.as-table").forEach(function (slot) {
    var spec = data.tables[slot.dataset.table];
    if (spec) new SortableTable(slot, decodeTable(spec), TABLE_PAGE);
  });

  // What units.js and views.js (the same script, after this file) build on.
  var kit = window.actscopeKit = { el: el, userEl: userEl, plainIsolated: plainIsolated, fmt: fmt, decode: decode, data: data, units: null };

  if (data.neurons) neuronBrowser(data.neurons);

  function offsets(counts, n) {
    var out = new Int32Array(n + 1);
    for (var i = 0; i < n; i++) out[i + 1] = out[i] + counts[i];
    return out;
  }

  function neuronBrowser(spec) {
    var table = decodeTable(spec);
    var byName = {};
    table.columns.forEach(function (column) { byName[column.name] = column.values; });
    var sites = byName.site, units = byName.unit;
    var examples = spec.examples, decoded = spec.decoded;
    var exStart = examples ? offsets(decode(examples.cnt, table.n), table.n) : null;
    var decStart = decoded ? offsets(decode(decoded.cnt, table.n), table.n) : null;
    var tokens = decoded ? decode(decoded.token, decoded.score.length) : null;
    var directions = decoded ? decode(decoded.dir, decoded.score.length) : null;
    var card = document.getElementById("unit-card");
    var view = new SortableTable(document.getElementById("neuron-table"), table, NEURON_PAGE, showCard);
    var search = document.getElementById("unit-search"), count = document.getElementById("unit-count");
    var timer = null;

    function matches(query) {
      var terms = query.trim().toLowerCase().split(/\s+/).filter(Boolean);
      var rows = [];
      for (var i = 0; i < table.n; i++) {
        var ok = true;
        for (var t = 0; t < terms.length && ok; t++) {
          var term = terms[t];
          ok = /^\d+$/.test(term) ? units[i] === Number(term) : String(sites[i]).toLowerCase().indexOf(term) >= 0;
        }
        if (ok) rows.push(i);
      }
      return rows;
    }

    function runSearch() {
      var query = search.value;
      var rows = query.trim() ? matches(query) : null;
      view.setRows(rows);
      count.textContent = rows === null ? table.n + " units" : rows.length + " of " + table.n + " units match";
      if (rows && rows.length === 1) showCard(rows[0]);
    }

    search.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(runSearch, 120);
    });
    search.addEventListener("keydown", function (event) {
      if (event.key === "Enter") {
        clearTimeout(timer);
        runSearch();
        if (search.value.trim() && view.rows.length) showCard(view.rows[0]);  // Enter opens the first match
      }
    });
    count.textContent = table.n + " units";

    function showCard(row) {
      view.selected = row;
      view.render();
      var heading = el("h3");
      heading.append(userEl("span", "site", sites[row]), " \u00b7 unit " + units[row]);
      var parts = [heading];
      var stats = el("dl");
      table.columns.forEach(function (column) {
        if (column.name === "site" || column.name === "unit") return;
        var pair = stats.appendChild(el("div", "stat"));  // a dl may group each dt/dd pair in a div
        pair.appendChild(userEl("dt", "", column.name));
        pair.appendChild(cell("dd", column, row));
      });
      parts.push(stats);
      if (kit.units) parts.push.apply(parts, kit.units.before(spec, row, showCard));  // histogram
      if (examples) parts.push(exampleList(row));
      if (kit.units) parts.push.apply(parts, kit.units.after(spec, row, showCard));  // samples, co-firing
      if (decoded) parts.push.apply(parts, decodedLists(row));
      card.replaceChildren.apply(card, parts);
      card.hidden = false;
      card.dataset.row = String(row);
    }

    function exampleList(row) {
      var box = el("div", "examples-box");
      var start = exStart[row], stop = exStart[row + 1];
      var shown = examples.keep < examples.k ? " (strongest " + examples.keep + " of " + examples.k + "; the rest are in examples.parquet)" : "";
      box.appendChild(el("h4", "", "Top-activating examples" + shown));
      if (start === stop) { box.appendChild(el("p", "note", "no examples recorded for this unit")); return box; }
      var peak = 0;
      for (var e = start; e < stop; e++) peak = Math.max(peak, Math.abs(examples.val[e] || 0));
      var list = el("ol", "examples");
      var contexts = examples.contexts;
      for (var j = start; j < stop; j++) {
        var ctx = examples.ctx[j], value = examples.val[j];
        if (examples.img && examples.img[j] >= 0) {  // a run fed images: the thumbnail of what the unit saw
          list.className = "examples images";
          list.appendChild(imageItem(examples, j, value, contexts.doc[ctx]));
          continue;
        }
        var item = el("li", "example");
        item.appendChild(userEl("span", "ctx left", contexts.left[ctx] + " "));
        var token = userEl("span", "tok", contexts.token[ctx] || "(no text)");  // runs fed model inputs keep no text
        var strength = peak > 0 ? Math.abs(value || 0) / peak : 0;
        token.style.backgroundColor = "rgba(224, 123, 57, " + (0.15 + 0.75 * strength).toFixed(3) + ")";
        token.title = "activation " + fmt(value);
        item.appendChild(token);
        item.appendChild(userEl("span", "ctx right", " " + contexts.right[ctx]));
        item.appendChild(el("span", "meta", "a = " + fmt(value) + " \u00b7 doc " + contexts.doc[ctx] + " \u00b7 pos " + contexts.pos[ctx]));
        if (kit.units && examples.windows) {  // the unit's activation on every token around it
          var strip = kit.units.window(examples, j, row);
          if (strip) item.appendChild(strip);
        }
        list.appendChild(item);
      }
      box.appendChild(list);
      return box;
    }

    function imageItem(examples, j, value, doc) {
      var item = el("li", "example image");
      var picture = el("img", "thumb");
      picture.src = examples.uris[examples.img[j]];  // a data: URI built by actscope (the page's policy allows only those)
      var box = examples.box[j];
      picture.alt = "image " + doc + (box ? ", pixels y " + box[0] + "-" + box[2] + ", x " + box[1] + "-" + box[3] : "");
      picture.title = "activation " + fmt(value) + " \u00b7 " + picture.alt;
      item.appendChild(picture);
      item.appendChild(el("span", "meta", "a = " + fmt(value) + " \u00b7 image " + doc));
      return item;
    }

    function decodedLists(row) {
      var boxes = [];
      ["promoted", "suppressed"].forEach(function (direction) {
        var chips = el("div", "chips " + direction);
        for (var i = decStart[row]; i < decStart[row + 1]; i++) {
          if (directions[i] !== direction) continue;
          var chip = userEl("span", "", tokens[i]);
          chip.title = "score " + fmt(decoded.score[i]);
          chips.appendChild(chip);
        }
        if (chips.childNodes.length) {
          boxes.push(el("h4", "", "Decoded tokens: " + direction));
          boxes.push(chips);
        }
      });
      return boxes;
    }
  }
})();
