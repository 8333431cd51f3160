// Batchery dashboard: local times, and light polling of the parts marked `data-live`.
// Our own code, no framework. A `data-live="/ui/fragments/..."` element is refreshed every
// 2 s from that URL while it is not terminal; the fragment marks itself terminal with a
// `data-terminal` attribute on one of its elements (a page-wide element such as the
// overview carries `data-live-forever` and never stops).
"use strict";
(function () {
  var POLL_MS = 2000;
  var relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  var absolute = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  var UNITS = [["year", 31536000], ["month", 2592000], ["day", 86400], ["hour", 3600],
    ["minute", 60], ["second", 1]];

  function ago(date) {
    var seconds = (date.getTime() - Date.now()) / 1000;
    for (var i = 0; i < UNITS.length; i++) {
      if (Math.abs(seconds) >= UNITS[i][1] || UNITS[i][0] === "second") {
        return relative.format(Math.round(seconds / UNITS[i][1]), UNITS[i][0]);
      }
    }
    return "";
  }

  function localizeTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var date = new Date(el.getAttribute("datetime"));
      if (isNaN(date.getTime())) { return; }
      el.textContent = ago(date) + " (" + absolute.format(date) + ")";
      el.title = date.toISOString();
    });
  }

  function isTerminal(el) {
    return !el.hasAttribute("data-live-forever") && el.querySelector("[data-terminal]") !== null;
  }

  function poll(el) {
    if (isTerminal(el)) { return; }
    var url = el.getAttribute("data-live");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { return null; }
        return response.text();
      })
      .then(function (html) {
        if (html !== null && html !== undefined) {
          el.innerHTML = html;
          localizeTimes(el);
          el.dispatchEvent(new CustomEvent("batchery:updated", { bubbles: true }));
        }
      })
      .catch(function () { /* the server is restarting: try again on the next tick */ })
      .then(function () {
        if (!isTerminal(el)) { window.setTimeout(function () { poll(el); }, POLL_MS); }
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localizeTimes(document);
    window.setInterval(function () { localizeTimes(document); }, 30000);
    document.querySelectorAll("[data-live]").forEach(function (el) {
      window.setTimeout(function () { poll(el); }, POLL_MS);
    });
  });
  window.batchery = { localizeTimes: localizeTimes };
})();
