// The ranking page: rank the K responses by keyboard or by drag and drop, submit with fetch,
// and swap in the next item, which was preloaded in the background while this one was ranked.
//
// Keys: 1-9 put response N at the next rank; T or = ties the next pick with the previous rank;
// Backspace undoes the last placement; Enter submits; S skips; F flags with a reason.
// The ranking is a list of groups of completion ids, best first; a group of several is a tie.
(function () {
  "use strict";

  var root = document.getElementById("labeler");
  if (!root) return;
  var nextUrl = root.dataset.nextUrl;
  var csrf = root.querySelector("[name=csrfmiddlewaretoken]").value;
  var doneEl = document.getElementById("done-count");
  var dialog = document.getElementById("flag-dialog");
  var flagForm = document.getElementById("flag-form");
  var flagReason = document.getElementById("flag-reason");

  var state = null; // the item on screen
  var preload = null; // Promise of the next item's {item_id, html} (or null when it failed)
  var busy = false;

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify(body || {}),
    }).then(function (response) {
      return response.json().catch(function () {
        return { error: "The server answered " + response.status + "." };
      }).then(function (data) {
        if (!response.ok) {
          var err = new Error(data.error || "The server answered " + response.status + ".");
          err.status = response.status;
          throw err;
        }
        return data;
      });
    });
  }

  function $(selector) {
    return state.el.querySelector(selector);
  }

  function setStatus(text, isError) {
    var el = state && $("#status");
    if (!el) return;
    el.textContent = text || "";
    el.classList.toggle("error", !!isError);
  }

  function cardOf(cid) {
    for (var i = 0; i < state.cards.length; i++) {
      if (Number(state.cards[i].dataset.completionId) === cid) return state.cards[i];
    }
    return null;
  }

  function rankOf(cid) {
    for (var i = 0; i < state.groups.length; i++) {
      if (state.groups[i].indexOf(cid) !== -1) return i;
    }
    return -1;
  }

  function placedCount() {
    return state.groups.reduce(function (n, g) { return n + g.length; }, 0);
  }

  function complete() {
    return state && placedCount() === state.cards.length;
  }

  function unplace(cid) {
    state.groups = state.groups
      .map(function (g) { return g.filter(function (x) { return x !== cid; }); })
      .filter(function (g) { return g.length > 0; });
    state.history = state.history.filter(function (x) { return x !== cid; });
  }

  // Put `cid` at the next rank (tied with the previous one after T), or into group `into`
  // (a tie when ties are allowed, else a new rank right below it). Moves it if placed already.
  function place(cid, into) {
    if (!cardOf(cid)) return;
    unplace(cid);
    var last = state.groups.length - 1;
    if (typeof into === "number" && into <= last) {
      if (state.allowTies) state.groups[into].push(cid);
      else state.groups.splice(into + 1, 0, [cid]);
    } else if (into === undefined && state.tieNext && state.allowTies && last >= 0) {
      state.groups[last].push(cid);
    } else {
      state.groups.push([cid]);
    }
    state.tieNext = false;
    state.history.push(cid);
    render();
  }

  // Give `cid` a rank of its own just above the group now at `index` (index = the number of
  // groups: the bottom), the groups below moving down one: a drop between two ranks.
  function insertRank(cid, index) {
    if (!cardOf(cid)) return;
    var below = (state.groups[index] || []).filter(function (x) { return x !== cid; })[0];
    unplace(cid);
    var at = below === undefined ? Math.min(index, state.groups.length) : rankOf(below);
    state.groups.splice(at, 0, [cid]);
    state.tieNext = false;
    state.history.push(cid);
    render();
  }

  // The start of a response's text, so a chip says which response it is without a lookup.
  function snippet(card, length) {
    var text = card.querySelector(".markdown").textContent.replace(/\s+/g, " ").trim();
    return text.length > length ? text.slice(0, length - 1).trimEnd() + "\u2026" : text;
  }

  function placeByKey(n) {
    var card = state.cards[n - 1];
    if (!card) return;
    var cid = Number(card.dataset.completionId);
    if (rankOf(cid) !== -1) {
      setStatus("Response " + n + " is ranked already; Backspace undoes the last pick.", true);
      return;
    }
    place(cid);
  }

  function undo() {
    var cid = state.history.pop();
    if (cid === undefined) return;
    unplace(cid);
    state.tieNext = false;
    render();
  }

  function toggleTie() {
    if (!state.allowTies) {
      setStatus("This project does not allow ties.", true);
      return;
    }
    if (state.groups.length === 0) {
      setStatus("Rank a response first; T ties the next one with it.", true);
      return;
    }
    state.tieNext = !state.tieNext;
    render();
  }

  function render() {
    var ol = $("#ranking");
    ol.textContent = "";
    state.groups.forEach(function (group, index) {
      // a drop here makes a new rank between rank `index` and the one above it
      var gap = document.createElement("li");
      gap.className = "rank-gap";
      gap.dataset.before = String(index + 1);
      gap.setAttribute("aria-hidden", "true");
      gap.title = index === 0 ? "Drop here for a new best rank" : "Drop here for a new rank between " + index + " and " + (index + 1);
      dropTarget(gap, function (cid) { insertRank(cid, index); });
      ol.appendChild(gap);
      var li = document.createElement("li");
      li.className = "rank-group" + (group.length > 1 ? " tie" : "");
      li.dataset.rank = String(index + 1);
      var no = document.createElement("span");
      no.className = "rank-no";
      no.textContent = String(index + 1);
      li.appendChild(no);
      group.forEach(function (cid) {
        var card = cardOf(cid);
        var chip = document.createElement("span");
        chip.className = "chip";
        chip.draggable = true;
        chip.dataset.completionId = String(cid);
        var key = document.createElement("span");
        key.className = "chip-key";
        key.textContent = card.dataset.key;
        var text = document.createElement("span");
        text.className = "chip-text";
        text.textContent = snippet(card, 48);
        chip.appendChild(key);
        chip.appendChild(text);
        chip.title = "Response " + card.dataset.key + ": " + snippet(card, 240);
        chip.addEventListener("dragstart", onDragStart);
        var remove = document.createElement("button");
        remove.type = "button";
        remove.className = "chip-remove";
        remove.setAttribute("aria-label", "Unrank response " + card.dataset.key);
        remove.textContent = "\u00d7";
        remove.addEventListener("click", function () {
          unplace(cid);
          render();
        });
        chip.appendChild(remove);
        li.appendChild(chip);
      });
      dropTarget(li, function (cid) { place(cid, index); });
      ol.appendChild(li);
    });
    state.cards.forEach(function (card) {
      var rank = rankOf(Number(card.dataset.completionId));
      card.classList.toggle("placed", rank !== -1);
      card.querySelector(".rank-badge").textContent =
        rank === -1 ? "" : "rank " + (rank + 1) + (state.groups[rank].length > 1 ? " (tie)" : "");
    });
    var tie = $("#tie-next");
    if (tie) tie.checked = state.tieNext;
    $("#submit-ranking").disabled = !complete() || busy;
    var left = state.cards.length - placedCount();
    setStatus(
      left === 0
        ? "All ranked. Enter submits."
        : left + " to rank" + (state.tieNext ? " \u00b7 the next pick ties with rank " + state.groups.length : "")
    );
  }

  function onDragStart(event) {
    var cid = event.currentTarget.dataset.completionId;
    event.dataTransfer.setData("text/plain", cid);
    event.dataTransfer.effectAllowed = "move";
  }

  function dropTarget(el, onDrop) {
    el.addEventListener("dragover", function (event) {
      event.preventDefault();
      event.stopPropagation();
      event.dataTransfer.dropEffect = "move";
      el.classList.add("over");
    });
    el.addEventListener("dragleave", function () { el.classList.remove("over"); });
    el.addEventListener("drop", function (event) {
      event.preventDefault();
      event.stopPropagation();
      el.classList.remove("over");
      var cid = Number(event.dataTransfer.getData("text/plain"));
      if (state && cardOf(cid)) onDrop(cid);
    });
  }

  // body[data-preload] = "pending" | "done": a hook for browser tests (and a debugging aid).
  function startPreload() {
    document.body.dataset.preload = "pending";
    preload = post(nextUrl, { after: state.itemId })
      .catch(function () { return null; })
      .then(function (data) {
        document.body.dataset.preload = "done";
        return data;
      });
  }

  // Show the preloaded item (or fetch one if the preload failed) without reloading the page.
  function advance() {
    var pending = preload || Promise.resolve(null);
    preload = null;
    var after = state ? state.itemId : null;
    return pending
      .then(function (data) { return data || post(nextUrl, { after: after }); })
      .then(function (data) {
        var holder = document.createElement("div");
        holder.innerHTML = data.html; // server-rendered template; markdown sanitized by nh3
        var fresh = holder.querySelector("#item");
        document.getElementById("item").replaceWith(fresh);
        busy = false;
        init();
        window.scrollTo(0, 0);
      })
      .catch(function () { window.location.reload(); });
  }

  function submit() {
    if (busy || !state) return;
    if (!complete()) {
      // The server's and the database's rule, in the same words (rlhf/rankings.py).
      var left = state.cards.length - placedCount();
      setStatus("A ranking must rank each response exactly once: " + left + " left to rank.", true);
      return;
    }
    busy = true;
    $("#submit-ranking").disabled = true;
    setStatus("Submitting\u2026");
    var seconds = (performance.now() - state.started) / 1000;
    post(state.el.dataset.submitUrl, {
      groups: state.groups,
      rationale: $("#rationale").value,
      seconds_spent: Math.round(seconds * 10) / 10,
      display_order: state.cards.map(function (c) { return Number(c.dataset.completionId); }),
    })
      .then(function (data) {
        if (state.revise) {
          // the revision replaced the ranking: back to the list that says which one counts
          window.location.assign(state.el.dataset.returnUrl);
          return null;
        }
        doneEl.textContent = String(data.done);
        return advance();
      })
      .catch(function (err) {
        busy = false;
        setStatus(err.message, true);
        $("#submit-ranking").disabled = !complete();
      });
  }

  function skip() {
    if (busy || !state.el.dataset.skipUrl) return;
    busy = true;
    setStatus("Skipping\u2026");
    post(state.el.dataset.skipUrl, {})
      .then(advance)
      .catch(function (err) { busy = false; setStatus(err.message, true); });
  }

  var flagReasonError = document.getElementById("flag-reason-error");

  // Details are required only while "Other" is chosen; the message says so in words on the page
  // (not only in the browser's own tooltip), and goes away as soon as it no longer applies.
  function flagOtherPicked() {
    var picked = flagForm.querySelector("[name=flag-category]:checked");
    return !!picked && picked.value === "other";
  }

  function showFlagReasonError(show) {
    flagReasonError.hidden = !show;
    flagReason.setAttribute("aria-invalid", show ? "true" : "false");
  }

  function syncFlagReason() {
    flagReason.required = flagOtherPicked();
    if (!flagReason.required || flagReason.value.trim()) showFlagReasonError(false);
  }

  flagForm.addEventListener("change", syncFlagReason);
  flagReason.addEventListener("input", syncFlagReason);
  // The browser blocks the submit of an empty required field before "submit" fires: show ours.
  flagReason.addEventListener("invalid", function () { showFlagReasonError(true); });

  function openFlag() {
    if (busy || !state.el.dataset.flagUrl) return;
    flagForm.reset();
    syncFlagReason();
    showFlagReasonError(false);
    dialog.showModal();
    flagForm.querySelector("[name=flag-category]").focus();
  }

  flagForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var picked = flagForm.querySelector("[name=flag-category]:checked");
    var reason = flagReason.value.trim();
    if (!picked) {
      flagForm.querySelector("[name=flag-category]").focus();
      return;
    }
    if (picked.value === "other" && !reason) {
      // only spaces typed: the browser's check passed, ours did not
      showFlagReasonError(true);
      flagReason.focus();
      return;
    }
    dialog.close();
    busy = true;
    setStatus("Flagging\u2026");
    post(state.el.dataset.flagUrl, { category: picked.value, reason: reason })
      .then(advance)
      .catch(function (err) { busy = false; setStatus(err.message, true); });
  });
  document.getElementById("flag-cancel").addEventListener("click", function () { dialog.close(); });

  document.addEventListener("keydown", function (event) {
    if (!state || busy || dialog.open) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var target = event.target;
    var tag = target && target.tagName;
    if (tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT" || (target && target.isContentEditable)) {
      if (event.key === "Escape") target.blur();
      return;
    }
    var key = event.key;
    if (/^[1-9]$/.test(key)) {
      event.preventDefault();
      placeByKey(Number(key));
    } else if (key === "t" || key === "T" || key === "=") {
      event.preventDefault();
      toggleTie();
    } else if (key === "Backspace") {
      event.preventDefault();
      undo();
    } else if (key === "Enter") {
      if (tag === "BUTTON" || tag === "A" || tag === "SUMMARY") return; // let Enter press it
      event.preventDefault();
      submit();
    } else if (key === "s" || key === "S") {
      event.preventDefault();
      skip();
    } else if (key === "f" || key === "F") {
      event.preventDefault();
      openFlag();
    }
  });

  function init() {
    var el = document.getElementById("item");
    state = null;
    if (!el || !el.dataset.itemId) return;
    state = {
      el: el,
      itemId: Number(el.dataset.itemId),
      allowTies: el.dataset.allowTies === "true",
      cards: Array.prototype.slice.call(el.querySelectorAll(".response")),
      groups: [],
      history: [],
      tieNext: false,
      started: performance.now(),
      revise: el.dataset.mode === "revise",
    };
    if (state.revise) {
      // Revising: start from the labeler's current ranking (groups of completion ids).
      JSON.parse(el.dataset.initialGroups || "[]").forEach(function (group) {
        var known = group.filter(function (cid) { return cardOf(cid); });
        if (known.length) state.groups.push(known);
        state.history = state.history.concat(known);
      });
    }
    state.cards.forEach(function (card) {
      card.addEventListener("dragstart", onDragStart);
      card.querySelector(".place").addEventListener("click", function (event) {
        event.currentTarget.blur(); // so that Enter submits instead of pressing this again
        placeByKey(Number(card.dataset.key));
      });
    });
    dropTarget($("#new-rank"), function (cid) {
      unplace(cid);
      state.groups.push([cid]);
      state.history.push(cid);
      state.tieNext = false;
      render();
    });
    dropTarget($("#responses"), function (cid) {
      unplace(cid);
      render();
    });
    var tie = $("#tie-next");
    if (tie) tie.addEventListener("change", function () {
      state.tieNext = tie.checked && state.groups.length > 0;
      render();
    });
    $("#submit-ranking").addEventListener("click", submit);
    $("#undo").addEventListener("click", function (event) {
      event.currentTarget.blur();
      undo();
    });
    if (!state.revise) {
      $("#skip-item").addEventListener("click", skip);
      $("#flag-item").addEventListener("click", openFlag);
    }
    render();
    if (!state.revise) startPreload();
  }

  // On a phone the instructions push the responses below the fold: start them folded.
  var instructions = document.getElementById("instructions");
  if (instructions && window.matchMedia("(max-width: 700px)").matches) instructions.open = false;

  init();
})();
