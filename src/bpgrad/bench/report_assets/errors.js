// Loaded first (in <head>): every script error, unhandled rejection and console.error of the
// page is written into the js-errors box and counted in the body's data-js-errors, so that a
// reader sees that a chart failed and a headless browser test can assert that nothing did.
(function () {
  "use strict";
  var errors = [];
  function show() {
    var box = document.getElementById("js-errors");
    if (!box || !errors.length) return;
    box.hidden = false;
    box.textContent = "The page's script failed; some charts may be missing:\n" + errors.join("\n");
    document.body.setAttribute("data-js-errors", String(errors.length));
  }
  function record(message) {
    errors.push(String(message));
    show();
  }
  window.bpgradRecordError = record;
  window.addEventListener("error", function (event) {
    var where = event.filename ? " (" + event.filename + ":" + event.lineno + ")" : "";
    record((event.message || "error") + where);
  });
  window.addEventListener("unhandledrejection", function (event) {
    var reason = event.reason;
    record("unhandled rejection: " + (reason && reason.message ? reason.message : reason));
  });
  var consoleError = console.error;
  console.error = function () {
    record(Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", show);
})();
