// pneumoloc serve: upload one X-ray, show the model's estimate and draw its evidence.
// Everything is drawn client-side on a canvas from the X-ray PNG, the heatmap PNG (RGBA:
// colour map with alpha = heat) and the boxes (original pixels), so the opacity slider and
// the layer toggle need no new request. No external resources are used.
"use strict";

(function () {
  const TOKEN_KEY = "pneumoloc-token";
  const BOX_COLOUR = "#39ff14"; // the predicted-box colour of pneumoloc's reports
  const MIN_CANVAS = 640; // canvas pixels along the long side, at least
  const $ = (id) => document.getElementById(id);

  const state = { record: null, xray: null, heatmap: null };

  // ---------------------------------------------------------------- access token
  const tokenInput = $("token-input");
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  tokenInput.addEventListener("input", () => {
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
  });

  function authHeaders() {
    const token = tokenInput.value.trim();
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function askForToken() {
    $("token-box").open = true;
    tokenInput.focus();
  }

  // ---------------------------------------------------------------- messages
  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = !text;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") return body.detail;
    } catch (e) {
      /* not JSON */
    }
    return "the server answered " + response.status + " " + response.statusText;
  }

  // ---------------------------------------------------------------- model facts
  function addFact(dl, term, value) {
    if (value === null || value === undefined || value === "") return;
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    dl.append(dt, dd);
  }

  function fmt(x, digits) {
    return typeof x === "number" ? x.toFixed(digits) : x;
  }

  async function loadModel() {
    const dl = $("model-info");
    let response;
    try {
      response = await fetch("/api/model", { headers: authHeaders() });
    } catch (e) {
      dl.replaceChildren();
      addFact(dl, "Model", "the server cannot be reached");
      return;
    }
    dl.replaceChildren();
    if (response.status === 401) {
      addFact(dl, "Model", "enter the access token to see the model");
      askForToken();
      return;
    }
    if (!response.ok) {
      addFact(dl, "Model", await errorText(response));
      return;
    }
    const m = await response.json();
    addFact(dl, "Model", m.model_id);
    addFact(dl, "Decision threshold", fmt(m.threshold, 3));
    addFact(dl, "Heatmap method", m.cam_method + (m.tta ? " (with test-time augmentation)" : ""));
    addFact(dl, "Box rule", m.box_config && m.box_config.rule);
    const val = (m.metrics && m.metrics.val) || {};
    if (typeof val.auroc === "number") addFact(dl, "Validation AUROC", fmt(val.auroc, 3));
    if (m.data && m.data.n_train) {
      addFact(dl, "Training images", m.data.n_train + (m.data.kind ? " (" + m.data.kind + ")" : ""));
    }
    addFact(dl, "pneumoloc version", m.pneumoloc_version);
  }

  // ---------------------------------------------------------------- upload
  function loadImage(b64) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the display image could not be decoded"));
      img.src = "data:image/png;base64," + b64;
    });
  }

  async function analyse(file) {
    if (!file) return;
    showError("");
    setStatus("Analysing " + file.name + " …");
    $("file-input").disabled = true;
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const response = await fetch("/api/predict?images=1", {
        method: "POST",
        body: form,
        headers: authHeaders(),
      });
      if (response.status === 401) {
        setStatus("");
        showError("This server needs an access token: enter it under “Access token”, then choose the file again.");
        askForToken();
        return;
      }
      if (!response.ok) {
        setStatus("");
        showError("Could not analyse this file: " + (await errorText(response)));
        return;
      }
      const record = await response.json();
      const [xray, heatmap] = await Promise.all([
        loadImage(record.images.xray_png_b64),
        loadImage(record.images.heatmap_png_b64),
      ]);
      state.record = record;
      state.xray = xray;
      state.heatmap = heatmap;
      showResult(record);
      setStatus("Analysed: " + record.id);
    } catch (e) {
      setStatus("");
      showError("Could not analyse this file: " + e.message);
    } finally {
      $("file-input").disabled = false;
    }
  }

  // ---------------------------------------------------------------- result
  function showResult(r) {
    $("result").hidden = false;
    const pct = (100 * r.probability).toFixed(1) + "%";
    $("probability-text").textContent = pct;
    $("meter-fill").style.width = (100 * r.probability).toFixed(1) + "%";
    $("meter-threshold").style.left = (100 * r.threshold).toFixed(1) + "%";
    const decision = $("decision-text");
    decision.textContent =
      "Model decision at its threshold of " + (100 * r.threshold).toFixed(1) + "%: " +
      (r.decision === "pneumonia" ? "pneumonia suspected" : "no pneumonia suspected") + ".";
    decision.className = "decision " + (r.decision === "pneumonia" ? "pos" : "neg");
    const view = r.input.view_position ? ", view " + r.input.view_position : "";
    $("caption").textContent =
      r.id + " — " + r.input.format.toUpperCase() + ", " + r.image_width + " × " +
      r.image_height + " px" + view + ". Model " + r.model_id + ", heatmap " + r.cam_method + ".";

    const body = $("boxes-body");
    body.replaceChildren();
    r.boxes.forEach((b, i) => {
      const tr = document.createElement("tr");
      for (const v of [i + 1, b.confidence.toFixed(2), Math.round(b.x), Math.round(b.y),
                       Math.round(b.width), Math.round(b.height)]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.append(td);
      }
      body.append(tr);
    });
    $("boxes-table").hidden = r.boxes.length === 0;
    const none = $("no-boxes");
    none.hidden = r.boxes.length > 0;
    none.textContent = r.decision === "pneumonia"
      ? "No region stood out in the heatmap."
      : "No boxes: the probability is below the model's decision threshold.";
    draw();
  }

  function layer() {
    const checked = document.querySelector('input[name="layer"]:checked');
    return checked ? checked.value : "both";
  }

  function draw() {
    if (!state.record) return;
    const canvas = $("overlay");
    // Small images are drawn enlarged so that lines and labels keep a legible size.
    const scale = Math.max(1, MIN_CANVAS / Math.max(state.xray.naturalWidth, state.xray.naturalHeight));
    const w = Math.round(state.xray.naturalWidth * scale);
    const h = Math.round(state.xray.naturalHeight * scale);
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.globalAlpha = 1;
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(state.xray, 0, 0, w, h);
    const mode = layer();
    const opacity = Number($("opacity").value) / 100;
    if (mode !== "boxes" && opacity > 0) {
      ctx.globalAlpha = opacity;
      ctx.drawImage(state.heatmap, 0, 0, w, h);
      ctx.globalAlpha = 1;
    }
    if (mode !== "heatmap") drawBoxes(ctx, w, h);
  }

  function drawBoxes(ctx, w, h) {
    const r = state.record;
    const sx = w / r.image_width;
    const sy = h / r.image_height;
    const line = Math.max(2, Math.round(w / 250));
    const th = Math.max(12, Math.round(w / 45));
    ctx.font = "bold " + th + "px sans-serif";
    ctx.textBaseline = "top";
    r.boxes.forEach((b) => {
      const x = b.x * sx, y = b.y * sy, bw = b.width * sx, bh = b.height * sy;
      ctx.lineWidth = line + 2;
      ctx.strokeStyle = "rgba(0,0,0,0.8)";
      ctx.strokeRect(x, y, bw, bh);
      ctx.lineWidth = line;
      ctx.strokeStyle = BOX_COLOUR;
      ctx.strokeRect(x, y, bw, bh);
      const label = b.confidence.toFixed(2);
      const tw = ctx.measureText(label).width;
      ctx.fillStyle = "rgba(0,0,0,0.85)";
      ctx.fillRect(x + line, y + line, tw + 6, th + 4);
      ctx.fillStyle = BOX_COLOUR;
      ctx.fillText(label, x + line + 3, y + line + 2);
    });
  }

  // ---------------------------------------------------------------- download
  function download() {
    if (!state.record) return;
    const record = Object.assign({}, state.record);
    delete record.images; // the record, not the display pictures
    const blob = new Blob([JSON.stringify(record, null, 2) + "\n"], { type: "application/json" });
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = record.id + ".pneumoloc.json";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  // ---------------------------------------------------------------- wiring
  const input = $("file-input");
  input.addEventListener("change", () => analyse(input.files[0]));

  const zone = $("drop-zone");
  ["dragenter", "dragover"].forEach((type) =>
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    }));
  ["dragleave", "drop"].forEach((type) =>
    zone.addEventListener(type, () => zone.classList.remove("dragging")));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    const files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) analyse(files[0]);
  });

  const opacity = $("opacity");
  opacity.addEventListener("input", () => {
    $("opacity-value").textContent = opacity.value + "%";
    draw();
  });
  document.querySelectorAll('input[name="layer"]').forEach((el) =>
    el.addEventListener("change", draw));
  $("download").addEventListener("click", download);
  tokenInput.addEventListener("change", loadModel);

  loadModel();
})();
