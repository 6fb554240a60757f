(function () {
  "use strict";
  var table = document.getElementById("images-table");
  var source = document.getElementById("images-data");
  if (!table || !source) { return; }
  var data = JSON.parse(source.textContent);
  var names = data.names, rows = data.rows;  // row: [file, id, true, pred, conf, flags]
  var thumbDir = esc(data.thumbs), pageDir = esc(data.pages);  // folder URLs, with a final /
  var STATUS = ["wrong", "right", "unlabelled"];
  var tbody = table.tBodies[0];
  var text = document.getElementById("filter-text");
  var status = document.getElementById("filter-status");
  var shown = document.getElementById("shown-count");
  var size = document.getElementById("page-size");
  var info = document.getElementById("page-info");
  var collator = new Intl.Collator(undefined, {sensitivity: "base", numeric: true});
  var rank = names.map(function (_, i) { return i; });
  rank.sort(function (a, b) { return collator.compare(names[a], names[b]); });
  var nameRank = new Array(names.length + 1);
  rank.forEach(function (c, r) { nameRank[c + 1] = r + 1; });
  nameRank[0] = 0;  // no label sorts first
  var lower = names.map(function (n) { return n.toLowerCase(); });
  function label(c) { return c < 0 ? "(no label)" : names[c]; }
  function state(r) { return r[2] < 0 ? 2 : (r[2] === r[3] ? 1 : 0); }
  var KEYS = {
    "true": function (r) { return nameRank[r[2] + 1]; },
    "pred": function (r) { return nameRank[r[3] + 1]; },
    "conf": function (r) { return r[4] === null ? -1 : r[4]; },
    "status": function (r) { return STATUS[state(r)]; }
  };
  var order = rows.map(function (_, i) { return i; });  // sorted order of all rows
  var view = order;  // filtered rows, in sorted order
  var page = 0;
  function esc(v) {
    return String(v).replace(/[&<>"']/g, function (ch) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[ch];
    });
  }
  function cell(r) {
    var flags = r[5], inner = esc(r[0]);
    if (flags & 1) {
      inner = '<img class="thumb" loading="lazy" src="' + thumbDir + esc(r[1]) +
        '.jpg" alt="' + esc(r[0]) + '">';
    }
    if (flags & 2) { return '<a href="' + pageDir + esc(r[1]) + '.html">' + inner + "</a>"; }
    if (flags & 1) { return '<a href="' + thumbDir + esc(r[1]) + '.jpg">' + inner + "</a>"; }
    return inner;
  }
  function render() {
    var per = parseInt(size.value, 10);
    var pages = Math.max(1, Math.ceil(view.length / per));
    page = Math.min(Math.max(page, 0), pages - 1);
    var html = [];
    var end = Math.min(view.length, (page + 1) * per);
    for (var k = page * per; k < end; k += 1) {
      var r = rows[view[k]], st = STATUS[state(r)];
      html.push('<tr data-status="' + st + '"><td>' + cell(r) + "</td>" +
        '<td data-value="' + esc(label(r[2])) + '">' + esc(label(r[2])) + "</td>" +
        '<td data-value="' + esc(label(r[3])) + '">' + esc(label(r[3])) + "</td>" +
        '<td class="num" data-value="' + r[4] + '">' +
          (r[4] === null ? "nan" : r[4].toFixed(3)) + "</td>" +
        '<td data-value="' + st + '" class="' + st + '">' + st + "</td></tr>");
    }
    tbody.innerHTML = html.join("");
    shown.textContent = String(view.length);
    info.textContent = "page " + (page + 1) + " of " + pages;
    document.getElementById("page-first").disabled = page === 0;
    document.getElementById("page-prev").disabled = page === 0;
    document.getElementById("page-next").disabled = page >= pages - 1;
    document.getElementById("page-last").disabled = page >= pages - 1;
  }
  function apply() {
    var q = text.value.trim().toLowerCase();
    var s = status.value;
    var hit = names.map(function (n, c) { return !q || lower[c].indexOf(q) >= 0; });
    var noLabel = !q || "(no label)".indexOf(q) >= 0;
    view = order.filter(function (i) {
      var r = rows[i];
      if (s !== "all" && STATUS[state(r)] !== s) { return false; }
      return !q || (r[2] < 0 ? noLabel : hit[r[2]]) || hit[r[3]] ||
        r[0].toLowerCase().indexOf(q) >= 0;
    });
    page = 0;
    render();
  }
  function sortBy(th) {
    var key = KEYS[th.dataset.key];
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var sign = asc ? 1 : -1;
    var values = rows.map(key);
    order = rows.map(function (_, i) { return i; });
    order.sort(function (a, b) {
      var x = values[a], y = values[b];
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return c !== 0 ? sign * c : a - b;
    });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    apply();
  }
  Array.prototype.forEach.call(table.tHead.querySelectorAll("th[data-key]"), function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  function go(id, to) {
    document.getElementById(id).addEventListener("click", function () {
      page = to(page);
      render();
    });
  }
  go("page-first", function () { return 0; });
  go("page-prev", function (p) { return p - 1; });
  go("page-next", function (p) { return p + 1; });
  go("page-last", function () { return 1e9; });
  text.addEventListener("input", apply);
  status.addEventListener("change", apply);
  size.addEventListener("change", function () { page = 0; render(); });
  apply();
})();
