// ct-triage worklist page: refresh in place every data-refresh-s seconds.
// Fetches this same page, parses it (scripts in it never run) and swaps the parts
// the server rendered and escaped; no data is ever inserted as HTML here.
(function () {
  "use strict";
  var PARTS = ["tiles", "worklist-body", "chart", "updated"];
  var period = Math.max(1, parseFloat(document.body.getAttribute("data-refresh-s")) || 15) * 1000;

  function swap(fresh) {
    PARTS.forEach(function (id) {
      var current = document.getElementById(id);
      var next = fresh.getElementById(id);
      if (current && next) {
        current.replaceWith(document.importNode(next, true));
      }
    });
    document.body.classList.remove("stale");
  }

  function refresh() {
    fetch(window.location.pathname, {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (text) {
        swap(new DOMParser().parseFromString(text, "text/html"));
      })
      .catch(function () {
        document.body.classList.add("stale");
        var updated = document.getElementById("updated");
        if (updated) { updated.textContent = "connection lost, retrying\u2026"; }
      })
      .then(function () { window.setTimeout(refresh, period); });
  }

  window.setTimeout(refresh, period);
})();
