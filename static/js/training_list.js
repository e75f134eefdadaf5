/* Job list: while a job is queued or running, reload the list every 5 s (every 30 s when the
 * tab is hidden) so statuses and progress bars stay current without a websocket. */
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
