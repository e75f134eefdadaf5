/* Job list: the project filter applies on change (the page's CSP forbids inline handlers;
 * the Filter button stays for keyboards and no-JS), and while a job is queued or running the
 * list reloads every 5 s (every 30 s when the tab is hidden) so statuses and progress bars
 * stay current without a websocket. */
(function () {
  "use strict";
  var filter = document.getElementById("project-filter");
  if (filter) {
    filter.addEventListener("change", function () { filter.form.submit(); });
  }
})();
(function () {
  "use strict";
  var table = document.getElementById("job-table");
  if (!table || table.dataset.anyActive !== "1") return;
  function tick() {
    if (document.querySelector("#job-table input[type=checkbox]:checked")) {
      return setTimeout(tick, 5000); // don't lose the user's selection
    }
    window.location.reload();
  }
  setTimeout(tick, document.hidden ? 30000 : 5000);
})();
