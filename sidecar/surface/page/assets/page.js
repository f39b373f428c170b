// training-sidecar status page: refresh the live part in place, without a reload.
// The first HTML is complete (this script only keeps it current), so the page also
// works with JavaScript off. Nothing is fetched while the tab is hidden, nothing is
// swapped while the reader selects text, and what they opened or scrolled stays so.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main || !window.fetch) {
    return;
  }
  var seconds = Number(main.getAttribute("data-refresh-seconds")) || 5;
  var freshness = document.getElementById("freshness");
  var timer = null;
  var last = null; // the fragment shown, to skip a swap that would change nothing

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, seconds * 1000);
  }

  function selecting() {
    var selection = window.getSelection && window.getSelection();
    return selection && !selection.isCollapsed && main.contains(selection.anchorNode);
  }

  // <details data-key> open or closed, and <pre data-key> scrolled, as the reader left them.
  function remember() {
    var state = {};
    main.querySelectorAll("[data-key]").forEach(function (element) {
      state[element.getAttribute("data-key")] = {
        open: element.open,
        top: element.scrollTop,
      };
    });
    return state;
  }

  function restore(state) {
    main.querySelectorAll("[data-key]").forEach(function (element) {
      var was = state[element.getAttribute("data-key")];
      if (!was) {
        return;
      }
      if (element.tagName === "DETAILS") {
        element.open = was.open;
      }
      element.scrollTop = was.top;
    });
  }

  function say(text, stale) {
    if (freshness) {
      freshness.textContent = text;
      freshness.className = stale ? "stale" : "";
    }
  }

  function refresh() {
    if (document.visibilityState === "hidden") {
      return; // visibilitychange brings it back
    }
    if (selecting()) {
      schedule();
      return;
    }
    var abort = window.AbortController ? new AbortController() : null;
    var deadline = abort ? setTimeout(function () { abort.abort(); }, 15000) : null;
    fetch("/?fragment=live", {
      cache: "no-store",
      credentials: "same-origin",
      signal: abort ? abort.signal : undefined,
    })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        var rendered = response.headers.get("X-Rendered-At");
        return response.text().then(function (html) {
          if (html !== last) {
            var state = remember();
            main.innerHTML = html; // escaped by the server, like the first render
            restore(state);
            last = html;
          }
          if (rendered) {
            main.setAttribute("data-updated", rendered);
          }
          say("Updated " + new Date().toLocaleTimeString() + "; live while this page is open.");
        });
      })
      .catch(function (error) {
        var why = error && error.name === "AbortError" ? "no answer in 15 s" : error.message;
        say("The sidecar does not answer (" + why + "); showing what it said last. " +
          "Trying again.", true);
      })
      .then(function () {
        clearTimeout(deadline);
        schedule();
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") {
      refresh();
    }
  });
  last = main.innerHTML;
  schedule();
})();
