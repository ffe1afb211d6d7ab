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
  document.querySelectorAll("button.goto").forEach(function (btn) {
    btn.addEventListener("click", function () { focus(parseInt(btn.dataset.index, 10)); });
  });
})();
