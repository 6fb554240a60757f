(function () {
  "use strict";
  var source = document.getElementById("config");
  if (!source) { return; }
  var config = JSON.parse(source.textContent);
  var select = document.getElementById("feature-layer");
  var scanState = document.getElementById("scan-state");
  var channels = document.getElementById("channels");
  var view = document.getElementById("channel");
  var token = 0;

  function esc(v) {
    return String(v).replace(/[&<>"']/g, function (ch) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[ch];
    });
  }
  function post(url, body) {
    return fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-Convlens": "1"},
      body: JSON.stringify(body)}).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error(data.error || r.statusText); }
        return data;
      });
    });
  }
  function poll(data, mine, shown, done) {
    if (mine !== token) { return; }
    if (data.state === "done") { done(data); return; }
    if (data.state === "failed" || data.state === "cancelled") {
      shown.innerHTML = '<span class="error">' + esc(data.error || data.state) + "</span>";
      shown.dataset.state = data.state;
      return;
    }
    var pct = data.progress === null ? null : Math.round(100 * data.progress);
    shown.dataset.state = data.state;
    // built once per job and updated in place, so a click on cancel is never lost to a rebuild
    var line = shown.querySelector(".progress-line");
    if (!line || line.dataset.job !== data.job) {
      shown.innerHTML = '<span class="progress-line">working <progress max="100"></progress> ' +
        '<span class="pct"></span> <button type="button" class="cancel">cancel</button></span>';
      line = shown.querySelector(".progress-line");
      line.dataset.job = data.job;
      line.querySelector(".cancel").addEventListener("click", function () {
        post("/api/jobs/" + line.dataset.job + "/cancel", {});
      });
    }
    var bar = line.querySelector("progress");
    if (pct === null) { bar.removeAttribute("value"); } else { bar.value = pct; }
    line.querySelector(".pct").textContent = pct === null ? "" : pct + "%";
    fetch("/api/jobs/" + data.job + "?state=" + data.state + "&progress=" +
      (data.progress === null ? "" : data.progress)).then(function (r) { return r.json(); })
      .then(function (next) { poll(next, mine, shown, done); });
  }
  config.layers.forEach(function (l) {
    var o = document.createElement("option");
    o.value = l.name;
    o.textContent = l.name + " (" + l.type + ", " + l.shape + ")";
    select.appendChild(o);
  });
  function showChannel(layer, c, button) {
    token += 1;
    var mine = token;
    Array.prototype.forEach.call(channels.querySelectorAll("button"), function (b) {
      b.classList.toggle("chosen", b === button);
    });
    view.dataset.state = "queued";
    view.innerHTML = "projecting ...";
    post("/api/features/channel", {layer: layer, channel: c}).then(function (data) {
      poll(data, mine, view, function (d) {
        view.dataset.state = "done";
        view.dataset.channel = String(d.channel);
        view.innerHTML = "<h2>Layer " + esc(d.layer) + ", channel " + d.channel + "</h2>" +
          '<div class="examples">' + d.examples.map(function (e) {
            var name = e.image ? '<a href="/image/' + esc(e.image) + '.html">' + esc(e.name) +
              "</a>" : esc(e.name);
            return '<div class="example"><img class="projection" src="' + e.projection +
              '" alt="projection"> <img class="patch" src="' + e.patch + '" alt="patch">' +
              "<div>" + e.value.toPrecision(4) + " · " + name + "</div></div>";
          }).join("") + "</div>";
      });
    }).catch(function (e) { view.textContent = e.message; });
  }
  select.addEventListener("change", function () {
    var layer = select.value;
    channels.innerHTML = "";
    view.innerHTML = "";
    if (!layer) { return; }
    token += 1;
    var mine = token;
    scanState.dataset.state = "queued";
    post("/api/features/scan", {layer: layer}).then(function (data) {
      poll(data, mine, scanState, function (d) {
        scanState.dataset.state = "done";
        scanState.textContent = d.scanned + " images scanned; layer " + d.shape +
          "; the " + d.channels.length + " most active channels:";
        d.channels.forEach(function (ch) {
          var b = document.createElement("button");
          b.type = "button";
          b.dataset.channel = String(ch.channel);
          b.textContent = "c" + ch.channel + " (" + ch.value.toPrecision(3) + ")";
          b.addEventListener("click", function () { showChannel(layer, ch.channel, b); });
          channels.appendChild(b);
        });
      });
    }).catch(function (e) { scanState.textContent = e.message; });
  });
})();
