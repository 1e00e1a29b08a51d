// hakobu's console: moves the progress bars of transfers in flight and
// sends the Rerun and Resend buttons' requests. Served from the binary;
// the Content-Security-Policy allows no inline script.
"use strict";

function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = bytes, i = 0;
  while (v >= 1024 && i + 1 < units.length) { v /= 1024; i++; }
  return i === 0 ? bytes + " B" : v.toFixed(1) + " " + units[i];
}

// Polls the in-flight list; moves each bar, and reloads the page when a
// transfer starts or finishes (its row moves to another section).
function poll(section) {
  const url = section.dataset.poll;
  const tick = async () => {
    try {
      const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.ok) {
        const rows = await r.json();
        const shown = new Map();
        for (const el of section.querySelectorAll(".progress[data-key]")) shown.set(el.dataset.key, el);
        let changed = rows.length !== shown.size;
        for (const row of rows) {
          const el = shown.get(row.key);
          if (!el) { changed = true; continue; }
          const bar = el.querySelector("progress");
          bar.max = Math.max(row.total, 1);
          bar.value = row.done;
          const text = el.querySelector(".bytes");
          text.dataset.done = row.done;
          text.dataset.total = row.total;
          text.textContent = size(row.done) + " / " + size(row.total);
        }
        if (changed) { location.reload(); return; }
      }
    } catch (e) {
      // The agent may be restarting: try again at the next tick.
    }
    setTimeout(tick, 1000);
  };
  setTimeout(tick, 1000);
}

function show(box, ok, parts) {
  box.replaceChildren();
  box.className = ok ? "done" : "refused";
  for (const [cls, text] of parts) {
    if (!text) continue;
    const p = document.createElement("p");
    p.className = cls;
    p.textContent = text;
    box.appendChild(p);
  }
}

// A button POSTs with the header the session's changes must carry.
async function act(button) {
  const box = document.getElementById("action-result");
  const id = encodeURIComponent(button.dataset.id);
  button.disabled = true;
  show(box, true, [["message", "Working…"]]);
  try {
    const r = await fetch("/console/transfers/" + id + "/" + button.dataset.action, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-Hakobu-Csrf": "1", Accept: "application/json" },
    });
    let body;
    try { body = await r.json(); } catch (e) {
      show(box, false, [["message", "The session has ended: sign in again."]]);
      return;
    }
    show(box, body.ok, [
      ["code", body.code],
      ["message", body.message],
      ["sentence", body.sentence],
      ["todo", body.what_to_do ? "What to do: " + body.what_to_do : null],
    ]);
    const again = document.createElement("a");
    again.href = location.pathname;
    again.textContent = "Show the transfer as it stands now";
    box.appendChild(again);
  } catch (e) {
    show(box, false, [["message", "The agent did not answer: " + e]]);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const section = document.querySelector("section[data-poll]");
  if (section) poll(section);
  for (const b of document.querySelectorAll("button[data-action]")) {
    b.addEventListener("click", () => act(b));
  }
});
