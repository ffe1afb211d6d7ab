// OpenSeadragon over the slide's deep-zoom tiles; matched regions (level-0 boxes, which
// are deep-zoom image pixels because the server does not crop to the slide bounds) drawn
// as overlays, the query's own place (a pixel match) in its own colour. Clicking a region
// in the side list zooms to it.
(function () {
  var el = document.getElementById("osd");
  var boxes = JSON.parse(document.getElementById("viewer-boxes").textContent);
  var viewer = OpenSeadragon({
    element: el,
    tileSources: el.dataset.dzi,
    prefixUrl: el.dataset.prefix,
    showNavigator: true,
    maxZoomPixelRatio: 2,
    crossOriginPolicy: false,
    loadTilesWithAjax: false,
  });
  var overlays = [];
  function rect(b) { return viewer.viewport.imageToViewportRectangle(b.x, b.y, b.w, b.h); }
  function focus(i) {
    overlays.forEach(function (o, j) { o.classList.toggle("active", i === j); });
    var r = rect(boxes[i]);
    var pad = Math.max(r.width, r.height) * 1.5;
    viewer.viewport.fitBounds(new OpenSeadragon.Rect(r.x - pad, r.y - pad, r.width + 2 * pad, r.height + 2 * pad));
  }
  viewer.addHandler("open", function () {
    boxes.forEach(function (b, i) {
      var div = document.createElement("div");
      // a pixel match is the query itself found on this slide: drawn apart from the
      // regions that only look alike to the encoder
      var pixels = b.match === "pixels";
      div.className = "match-overlay" + (pixels ? " pixel-match" : "");
      div.id = "match-" + i;
      div.title = (pixels ? "The query region itself (pixel match" + (b.score !== null ? ", NCC " + b.score.toFixed(3) : "") + ")"
                          : "Matched region " + (i + 1) + (b.score !== null ? " (score " + b.score.toFixed(3) + ")" : ""));
      viewer.addOverlay({ element: div, location: rect(b) });
      overlays.push(div);
    });
    el.dataset.ready = "1";
  });
  // MIL attention heat map: one canvas pixel per tile of the slide's grid, stretched over
  // the tiles' level-0 extent, coloured by the tile's attention percentile in the slide.
  var controls = document.getElementById("attention");
  var heat = null;
  function heatColour(r) {  // blue (low) -> yellow -> red (high)
    var a = r < 0.5 ? [49 + 2 * r * (255 - 49), 54 + 2 * r * (221 - 54), 149 - 2 * r * 149] : [255, 221 - (2 * r - 1) * 221, 0];
    return "rgba(" + Math.round(a[0]) + "," + Math.round(a[1]) + "," + Math.round(a[2]) + "," + (0.25 + 0.55 * r).toFixed(2) + ")";
  }
  function drawHeat(doc) {
    if (heat) { viewer.removeOverlay(heat); heat = null; }
    if (!doc.tiles.length) return;
    var cell = doc.tiles[0].size, x0 = Infinity, y0 = Infinity, x1 = 0, y1 = 0;
    doc.tiles.forEach(function (t) { x0 = Math.min(x0, t.x); y0 = Math.min(y0, t.y); x1 = Math.max(x1, t.x + t.size); y1 = Math.max(y1, t.y + t.size); });
    var canvas = document.createElement("canvas");
    canvas.width = Math.ceil((x1 - x0) / cell);
    canvas.height = Math.ceil((y1 - y0) / cell);
    canvas.className = "attention-overlay";
    canvas.id = "attention-overlay";
    var ctx = canvas.getContext("2d");
    doc.tiles.forEach(function (t) {
      ctx.fillStyle = heatColour(t.rank);
      ctx.fillRect(Math.floor((t.x - x0) / cell), Math.floor((t.y - y0) / cell), Math.max(1, Math.round(t.size / cell)), Math.max(1, Math.round(t.size / cell)));
    });
    viewer.addOverlay({ element: canvas, location: viewer.viewport.imageToViewportRectangle(x0, y0, canvas.width * cell, canvas.height * cell) });
    heat = canvas;
  }
  function showAttention() {
    var toggle = document.getElementById("attention-toggle");
    var out = document.getElementById("attention-result");
    if (!toggle.checked) {
      if (heat) { viewer.removeOverlay(heat); heat = null; }
      out.textContent = "";
      controls.dataset.state = "hidden";
      return;
    }
    var run = document.getElementById("attention-run").value;
    controls.dataset.state = "loading";
    fetch(controls.dataset.url.replace("/mil/0/", "/mil/" + encodeURIComponent(run) + "/"), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.json().then(function (doc) { if (!r.ok) throw new Error(doc.message || r.statusText); return doc; }); })
      .then(function (doc) {
        if (!toggle.checked) return;
        drawHeat(doc);
        var probs = Object.keys(doc.probabilities).map(function (c) { return c + " " + doc.probabilities[c].toFixed(2); }).join(", ");
        out.textContent = "Predicted " + doc.label_column + ": " + doc.prediction + " (" + probs + "), " + doc.tiles.length + " tiles";
        controls.dataset.state = "shown";
      })
      .catch(function (err) { out.textContent = "Attention unavailable: " + err.message; controls.dataset.state = "error"; });
  }
  if (controls) {
    document.getElementById("attention-toggle").addEventListener("change", function () { if (el.dataset.ready) showAttention(); });
    document.getElementById("attention-run").addEventListener("change", function () { if (el.dataset.ready) showAttention(); });
    viewer.addHandler("open", function () { if (document.getElementById("attention-toggle").checked) showAttention(); });
  }
  document.querySelectorAll("button.goto").forEach(function (btn) {
    btn.addEventListener("click", function () { focus(parseInt(btn.dataset.index, 10)); });
  });
})();
