(function () {
  "use strict";
  var body = document.body;
  var refresh = parseInt(body.getAttribute("data-refresh") || "0", 10);
  var timer = null;
  // Reload on a timer; any key press postpones it so a reload never interrupts the reader.
  function arm() {
    if (refresh > 0) {
      clearTimeout(timer);
      timer = setTimeout(function () { location.reload(); }, refresh * 1000);
    }
  }
  var links = Array.prototype.slice.call(document.querySelectorAll("tr.study a.open"));
  function current() {
    return links.indexOf(document.activeElement);
  }
  function focusAt(i) {
    if (!links.length) { return; }
    var link = links[Math.max(0, Math.min(links.length - 1, i))];
    link.focus();
    try { sessionStorage.setItem("triage-focus", link.getAttribute("href")); } catch (e) { }
  }
  document.addEventListener("keydown", function (e) {
    arm();
    var tag = (e.target && e.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) { return; }
    if (e.key === "j") { focusAt(current() + 1); e.preventDefault(); }
    else if (e.key === "k") { focusAt(current() < 0 ? 0 : current() - 1); e.preventDefault(); }
    else if (e.key === "/") {
      var q = document.getElementById("q");
      if (q) { q.focus(); e.preventDefault(); }
    }
  });
  // After an automatic reload, put the focus back on the study the reader was on.
  var saved = null;
  try { saved = sessionStorage.getItem("triage-focus"); } catch (e) { }
  if (saved) {
    for (var i = 0; i < links.length; i++) {
      if (links[i].getAttribute("href") === saved) { links[i].focus(); break; }
    }
  }
  arm();
}());
