// training-sidecar status page: refresh the live part in place, without a reload.
// The first HTML is complete (this script only keeps it current), so the page also
// works with JavaScript off. Nothing is fetched while the tab is hidden.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main || !window.fetch) {
    return;
  }
  var seconds = Number(main.getAttribute("data-refresh-seconds")) || 5;
  var freshness = document.getElementById("freshness");
  var timer = null;

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, seconds * 1000);
  }

  function refresh() {
    if (document.visibilityState === "hidden") {
      return; // visibilitychange brings it back
    }
    fetch("/?fragment=live", { cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        var rendered = response.headers.get("X-Rendered-At");
        return response.text().then(function (html) {
          main.innerHTML = html; // escaped by the server, like the first render
          if (rendered) {
            main.setAttribute("data-updated", rendered);
          }
          if (freshness) {
            freshness.textContent = "Updated " + new Date().toLocaleTimeString() +
              "; live while this page is open.";
            freshness.className = "";
          }
        });
      })
      .catch(function (error) {
        if (freshness) {
          freshness.textContent = "The sidecar does not answer (" + error.message +
            "); showing what it said last. Trying again.";
          freshness.className = "stale";
        }
      })
      .then(schedule);
  }

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") {
      refresh();
    }
  });
  schedule();
})();
