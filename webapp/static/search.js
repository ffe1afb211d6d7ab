// Drag-and-drop onto the region field, with a preview of the chosen image.
(function () {
  var drop = document.getElementById("drop");
  var input = document.getElementById("image");
  var preview = document.getElementById("preview");
  if (!drop || !input) return;
  function show(file) {
    if (!file || !file.type.startsWith("image/")) { preview.hidden = true; return; }
    preview.src = URL.createObjectURL(file);
    preview.alt = "Preview of " + file.name;
    preview.hidden = false;
  }
  input.addEventListener("change", function () { show(input.files[0]); });
  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) {
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      show(input.files[0]);
    }
  });
})();
