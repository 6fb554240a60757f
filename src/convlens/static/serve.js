(function () {
  "use strict";
  var source = document.getElementById("config");
  if (!source) { return; }
  var config = JSON.parse(source.textContent);

  function esc(v) {
    return String(v).replace(/[&<>"']/g, function (ch) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[ch];
    });
  }
  function json(method, url, body) {
    var init = {method: method, headers: {"X-Convlens": "1"}};
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error(data.error || r.statusText); }
        return data;
      });
    });
  }

  // ------------------------------------------------------------------ dropping an image
  var status = document.getElementById("upload-status");
  function upload(file) {
    if (!file) { return; }
    if (file.size > config.maxUpload) {
      status.textContent = file.name + " is too large (" + file.size + " bytes; the limit is " +
        config.maxUpload + ")";
      status.className = "note wrong";
      return;
    }
    status.textContent = "uploading " + file.name + " ...";
    fetch("/api/upload", {
      method: "POST",
      headers: {"Content-Type": "application/octet-stream", "X-Convlens": "1", "X-Filename": encodeURIComponent(file.name)},
      body: file
    }).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error(data.error || r.statusText); }
        window.location.href = data.url;
      });
    }).catch(function (e) {
      status.textContent = e.message;
      status.className = "note wrong";
    });
  }
  document.addEventListener("dragover", function (e) {
    e.preventDefault();
    document.body.classList.add("over");
  });
  document.addEventListener("dragleave", function (e) {
    if (e.target === document.documentElement || e.target === document.body) {
      document.body.classList.remove("over");
    }
  });
  document.addEventListener("drop", function (e) {
    e.preventDefault();
    document.body.classList.remove("over");
    var files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) { upload(files[0]); }
  });
  var picker = document.getElementById("file");
  if (picker) {
    picker.addEventListener("change", function () { upload(picker.files[0]); });
  }

  if (!config.image) { return; }  // the upload page

  // ------------------------------------------------------------------ the controls
  var image = config.image;
  var methods = config.methods;
  var byName = {};
  methods.forEach(function (m) { byName[m.name] = m; });
  var layerSelect = document.getElementById("layer");
  config.layers.forEach(function (l) {
    var o = document.createElement("option");
    o.value = l.name;
    o.textContent = l.name + " (" + l.type + ", " + (l.layout || l.shape) + ")";
    layerSelect.appendChild(o);
  });
  var box = document.getElementById("methods");
  var start = new URLSearchParams(window.location.search);
  var chosen = (start.get("methods") || "gradcam").split(",");
  var tokens = config.layers.some(function (l) { return l.layout; });
  box.innerHTML = '<span class="label">methods</span>' + methods.filter(function (m) {
    return tokens || !m.attention;  // attention methods need a transformer
  }).map(function (m) {
    var opts = Object.keys(m.options).map(function (k) { return k + ": " + m.options[k]; });
    return '<label title="' + esc(m.title + (opts.length ? "\n" + opts.join("\n") : "")) + '">' +
      '<input type="checkbox" name="method" value="' + esc(m.name) + '"' +
      (chosen.indexOf(m.name) >= 0 ? " checked" : "") + "> " + esc(m.name) +
      (m.long ? ' <small class="slow">slow</small>' : "") + "</label>";
  }).join("") + '<div class="row"><label>options <input id="options" type="text" ' +
    'placeholder="e.g. occlusion.patch=16, rise.n=500" size="40"></label></div>';
  var optionsInput = document.getElementById("options");

  var search = document.getElementById("class-search");
  var list = document.getElementById("class-list");
  var lastQuery = null;
  search.addEventListener("input", function () {
    var q = search.value;
    if (q === lastQuery) { return; }
    lastQuery = q;
    json("GET", "/api/classes?q=" + encodeURIComponent(q)).then(function (data) {
      list.innerHTML = data.classes.map(function (c) {
        return '<option value="' + esc(c.name) + '">' + c.index + "</option>";
      }).join("");
    });
  });
  search.addEventListener("change", function () {
    if (search.value.trim()) { setTarget("other"); }
  });
  search.addEventListener("focus", function () {
    if (lastQuery === null) { search.dispatchEvent(new Event("input")); }
  });

  function targetValue() {
    var r = document.querySelector('input[name="target"]:checked');
    if (r.value === "other") { return search.value.trim() || "pred"; }
    return r.value;
  }
  function setTarget(value, text) {
    if (text !== undefined) { search.value = text; }
    document.querySelector('input[name="target"][value="' + value + '"]').checked = true;
    update();
  }
  document.querySelectorAll('input[name="target"]').forEach(function (r) {
    r.addEventListener("change", update);
  });
  var why = document.getElementById("why-not");
  if (why) { why.addEventListener("click", function () { setTarget("true"); }); }
  document.querySelectorAll("#top5 .bar").forEach(function (b) {
    b.addEventListener("click", function () {
      var i = parseInt(b.dataset.index, 10);
      if (i === image.top5[0].index) { setTarget("pred"); }
      else if (i === image.label) { setTarget("true"); }
      else { setTarget("other", String(i)); }
    });
  });
  layerSelect.addEventListener("change", update);
  box.addEventListener("change", update);
  optionsInput.addEventListener("change", update);

  function methodOptions(name) {
    var out = {};
    optionsInput.value.split(/[,;]\s*(?=[\w+-]+\.\w+=)/).forEach(function (part) {
      var m = /^\s*([\w+-]+)\.(\w+)\s*=\s*(.+?)\s*$/.exec(part);
      if (m && m[1] === name) { out[m[2]] = m[3]; }
    });
    return out;
  }

  // ------------------------------------------------------------------ the maps
  var maps = document.getElementById("maps");
  var cards = {};
  function card(name) {
    if (cards[name]) { return cards[name]; }
    var el = document.createElement("div");
    el.className = "map";
    el.dataset.method = name;
    el.innerHTML = "<h3>" + esc(byName[name].title) + "</h3>" +
      '<img alt="' + esc(name) + ' map">' +
      '<div class="state"></div><div class="caption"></div>';
    maps.appendChild(el);
    cards[name] = {el: el, img: el.querySelector("img"), state: el.querySelector(".state"),
      caption: el.querySelector(".caption"), token: 0, job: null};
    return cards[name];
  }
  // The progress line of a job is built once and then updated in place: a line rebuilt on
  // every progress report would replace the cancel button under the user's pointer, and a
  // click landing between two rebuilds would be lost.
  function showProgress(c, data) {
    var pct = data.progress === null ? null : Math.round(100 * data.progress);
    var line = c.state.querySelector(".progress-line");
    if (!line || line.dataset.job !== data.job) {
      c.state.innerHTML = '<span class="progress-line"><span class="what"></span> ' +
        '<progress max="100"></progress> <span class="pct"></span> ' +
        '<button type="button" class="cancel">cancel</button></span>';
      line = c.state.querySelector(".progress-line");
      line.dataset.job = data.job;
      line.querySelector(".cancel").addEventListener("click", function () {
        json("POST", "/api/jobs/" + line.dataset.job + "/cancel");
      });
    }
    line.querySelector(".what").textContent = data.state === "queued" ? "waiting" : "computing";
    var bar = line.querySelector("progress");
    if (pct === null) { bar.removeAttribute("value"); } else { bar.value = pct; }
    line.querySelector(".pct").textContent = pct === null ? "" : pct + "%";
  }
  function show(c, token, data) {
    if (token !== c.token) { return; }  // an older request
    c.job = data.job;
    c.el.dataset.state = data.state;
    if (data.state === "done") {
      c.el.classList.remove("busy");
      c.img.src = data.map;
      c.img.dataset.target = data.target;
      c.img.dataset.layer = data.layer || "";
      c.el.dataset.key = c.key;
      c.state.textContent = "";
      c.caption.textContent = data.target_name + " (p=" + data.prob.toFixed(3) + ")" +
        (data.layer ? " · layer " + data.layer : "") + " · " + data.method_seconds.toFixed(2) + " s" +
        (data.notes.length ? " · " + data.notes.join("; ") : "");
      return;
    }
    if (data.state === "failed" || data.state === "cancelled") {
      c.el.classList.remove("busy");
      c.state.innerHTML = '<span class="error">' +
        esc(data.state === "failed" ? data.error : "cancelled") + "</span>";
      return;
    }
    showProgress(c, data);
    json("GET", "/api/jobs/" + data.job + "?state=" + data.state + "&progress=" +
      (data.progress === null ? "" : data.progress)).then(function (next) {
      show(c, token, next);
    }).catch(function (e) { fail(c, token, e); });
  }
  function fail(c, token, e) {
    if (token !== c.token) { return; }
    c.el.classList.remove("busy");
    c.el.dataset.state = "failed";
    c.state.innerHTML = '<span class="error">' + esc(e.message) + "</span>";
  }
  function update() {
    var names = Array.prototype.map.call(
      box.querySelectorAll('input[name="method"]:checked'), function (i) { return i.value; });
    Object.keys(cards).forEach(function (n) {
      if (names.indexOf(n) < 0) { maps.removeChild(cards[n].el); delete cards[n]; }
    });
    var target = targetValue(), layer = layerSelect.value;
    var shown = target === "pred" ? image.top5[0].index : (target === "true" ? image.label : target);
    document.querySelectorAll("#top5 .bar").forEach(function (b) {
      b.classList.toggle("chosen", b.dataset.index === String(shown));
    });
    names.forEach(function (name) {
      var c = card(name);
      var body = {image: image.id, method: name, target: target,
        layer: byName[name].layer ? layer : "", options: methodOptions(name)};
      var key = JSON.stringify(body);
      if (key === c.key) { return; }
      c.key = key;
      c.token += 1;
      var token = c.token;
      c.el.classList.add("busy");
      c.el.dataset.state = "queued";
      c.state.textContent = "computing ...";
      json("POST", "/api/explain", body).then(function (data) {
        show(c, token, data);
      }).catch(function (e) { fail(c, token, e); });
    });
  }
  update();
})();
