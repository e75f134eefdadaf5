/* Job list: the project filter applies on change (the page's CSP forbids inline handlers;
 * the Filter button stays for keyboards and no-JS), and while a job is queued or running the
 * list polls /training/jobs/poll through Poll (poll.js) with the newest job id as its cursor:
 * the active rows' status, place in the queue or pace, and progress update in place, and a
 * job launched meanwhile (another tab, the API) is announced with a link that shows it. */
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
  var base = table.dataset.pollUrl;
  var newJobs = 0;

  function activeIds() {
    return Array.from(table.querySelectorAll("tr[data-active]")).map(function (tr) {
      return tr.dataset.jobId;
    });
  }

  function set(el, value) {
    if (el && el.textContent !== value) el.textContent = value;
  }

  function showRow(job) {
    var tr = table.querySelector('tr[data-job-id="' + job.id + '"]');
    if (!tr) return;
    var badge = tr.querySelector("[data-status]");
    if (badge) {
      badge.dataset.status = job.status;
      set(badge, job.status + (job.cancel_requested && job.status === "running" ? " (cancelling)" : ""));
    }
    set(tr.querySelector("[data-field=queue]"), job.queue_note);
    set(tr.querySelector("[data-field=step]"), job.step + (job.total_steps ? "/" + job.total_steps : ""));
    var bar = tr.querySelector("[data-field=progress]");
    if (bar) bar.value = job.progress;
    var cancel = tr.querySelector("[data-cancel]");
    if (cancel && (!job.is_active || job.cancel_requested)) cancel.hidden = true;
    if (!job.is_active) delete tr.dataset.active;
  }

  function showNew(count) {
    var note = document.getElementById("new-jobs");
    if (!note || !count) return;
    newJobs += count;
    set(note.querySelector("span"), newJobs === 1 ? "1 job launched since this page loaded." : newJobs + " jobs launched since this page loaded.");
    note.hidden = false;
  }

  window.Poll.start({
    url: function (cursor) {
      return base + (base.indexOf("?") < 0 ? "?" : "&") + "after=" + cursor + "&ids=" + activeIds().join(",");
    },
    cursor: Number(table.dataset.cursor) || 0,
    onData: function (data) {
      data.jobs.forEach(showRow);
      showNew(data.new_jobs);
      return activeIds().length > 0;
    },
    fastMs: 3000,
    hiddenMs: 30000,
    wait: true,
  });
})();
