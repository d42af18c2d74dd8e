// The only script of the approval page: refresh the pending list without reloading, count time down.
// It inserts only what the server rendered (autoescaped) and never builds markup from data.
"use strict";
(function () {
  const box = document.getElementById("pending-box");
  function countdown() {
    for (const el of document.querySelectorAll(".left[data-deadline]")) {
      const s = Math.max(0, Math.floor(Number(el.dataset.deadline) - Date.now() / 1000));
      el.textContent = Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    }
  }
  async function refresh() {
    try {
      const r = await fetch(box.dataset.src, {credentials: "same-origin", headers: {"Accept": "text/html"}});
      if (r.redirected || !r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const next = doc.getElementById("pending");
      const cur = document.getElementById("pending");
      if (next && cur && next.dataset.key !== cur.dataset.key) {
        cur.replaceWith(document.importNode(next, true));
        countdown();
      }
    } catch (e) { /* the recorder is restarting: try again at the next tick */ }
  }
  if (box) setInterval(refresh, 500);
  setInterval(countdown, 1000);
})();
