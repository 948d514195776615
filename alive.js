// alive.js: the asok browser runtime. asok serves it minified: lines that are only a comment,
// indentation, trailing " // " comments and spaces beside punctuation go (keep " // ", quotes
// and spaces out of regular expressions), so comment freely.
// A line "//# part: name" starts a part served as a second script only to pages that need it.
(() => {
const COMPONENT = "[data-asok-component]";
const page = Math.random() + ":", bags = new Map, byId = id => document.getElementById(id); // cid -> {queue, field, timer, sent, id, models}
let socket, retry = 99, counter = 0; // 99: no socket has opened yet
// a state token is JSON {s: state, v: version, q: save number, t: issued, r: reference} + "." + signature;
// once the session holds the state, a reference (JSON {v, q, t} + "." + signature) stands for it
const fields = token => JSON.parse(token.slice(0, token.lastIndexOf("."))), ref = root => fields(root.dataset.asokState).r || root.dataset.asokState, csrf = () => document.querySelector("meta[name=csrf-token]")?.content;

// one FIFO queue per component; a debounced input waits at its tail
function enqueue(cid, call, field) {
  const bag = bags.get(cid) || bags.set(cid, {queue: [], models: {}}).get(cid);
  clearTimeout(bag.timer);
  if (field && field == bag.field) bag.queue.pop();
  if (call) bag.queue.push(call);
  if (bag.field = field) bag.timer = setTimeout(() => enqueue(cid), 150);
  send(cid, bag);
}

// one event in flight per component
function send(cid, bag, root = byId(cid)) {
  if (!bag.sent && bag.queue.length > !!bag.field) {
    const [method, args] = bag.queue.shift(), id = bag.id = page + ++counter, data = root.dataset;
    if (method == "$model") bag.models[args[0]] = args[1];
    // h: the save number of the HTML held (root.h = [q, html]), which a reply may then change
    bag.sent = JSON.stringify({id, cid, component: data.asokComponent, state: ref(root), method, args, csrf: csrf(), h: (bag.h = root.h)?.[0]});
    socket.readyState == 1 && socket.send(bag.sent);
  }
  root.classList.toggle("asok-loading", !!bag.sent);
}

// a reply {id, html, state}, {id, d: [a, b, text, ...], state} (the HTML held, its characters a
// to b replaced by text, for each hunk) or {id, error}; a push {cid, html, state} or {cid, error}
function receive(message) {
  const m = JSON.parse(message.data), {id, cid, d, state, error} = m;
  let root = cid && byId(cid), bag, html = m.html, q;
  bags.forEach((b, c) => { if (b.sent && b.id == id) root = byId(c), bag = b; });
  if (!root) return;
  if (bag) bag.sent = null;
  // a refusal that a reload cures reloads the page, once until an event succeeds again
  if (error?.reload && !sessionStorage.asokReloaded) location.reload(sessionStorage.asokReloaded = 1);
  else if (error) console.error("asok:", error.code, error.message), root.dispatchEvent(new CustomEvent("asok:error", {bubbles: 1, detail: error}));
  else {
    delete sessionStorage.asokReloaded;
    // HTML older than what the component shows (a reply overtaken by a push) is dropped; the
    // queues of components that left the page are forgotten
    if ((q = fields(state).q) >= fields(root.dataset.asokState).q) {
      if (d) for (let i = (html = bag.h[1], d.length); i; i -= 3) html = html.slice(0, d[i - 3]) + d[i - 1] + html.slice(d[i - 2]);
      root.h = [q, html];
      morph(root, Object.assign(document.createElement("template"), {innerHTML: html}).content);
      root.dataset.asokState = state;
      self.asokMorphed?.(root); // ws-hook, in the hooks part
      bags.forEach((bag, cid) => byId(cid) || bags.delete(cid, clearTimeout(bag.timer)));
    }
    self.asokSync?.(root, bag?.models); // the part "model", on pages with ws-model fields
  }
  bag && send(root.id, bag);
}

// morph: a new node takes the old sibling with its id, else the old node at the cursor if that
// has its tag and no id, else it is inserted. A match further on stays (an iframe is not reloaded,
// the focus is not lost): the old nodes before it move behind it, unless the one at the cursor
// holds the focus; then the match moves to the cursor instead.
function morph(old, fresh) {
  const focus = document.activeElement, ids = new Map([...old.children].map(el => [el.id, el]));
  let cursor = old.firstChild;
  for (const next of [...fresh.childNodes]) {
    const match = next.id ? ids.get(next.id) : !cursor?.id && cursor;
    ids.delete(next.id);
    if (match?.nodeName != next.nodeName) {
      old.insertBefore(next, cursor);
      continue;
    }
    if (match != cursor && cursor.contains(focus)) old.insertBefore(match, cursor);
    else {
      for (const stop = cursor.previousSibling; match.previousSibling != stop;) match.after(match.previousSibling);
      cursor = match.nextSibling;
    }
    // text, comment
    if (match.nodeType != 1) match.nodeValue = next.nodeValue;
    // attributes that changed, children, form values (the focused one's is the user's); ws-ignore stays
    else if (!match.hasAttribute("ws-ignore")) {
      for (const {name, value} of next.attributes) if (match.getAttribute(name) != value) match.setAttribute(name, value);
      for (const {name} of [...match.attributes]) next.hasAttribute(name) || match.removeAttribute(name);
      morph(match, next);
      for (const prop of ["value", "checked"]) if (match != focus && match[prop] != next[prop]) match[prop] = next[prop];
    }
  }
  while (cursor?.nextSibling) cursor.nextSibling.remove();
  cursor?.remove();
}

function connect() {
  socket = new WebSocket(location.origin.replace("http", "ws") + "/asok/live");
  socket.onmessage = receive;
  socket.onopen = () => {
    retry = 100;
    document.documentElement.classList.remove("asok-disconnected");
    // join: the components shown and their saves; the server sends newer HTML, then pushes
    socket.send(JSON.stringify({join: [...document.querySelectorAll(COMPONENT)].map(root => [root.id, root.dataset.asokComponent,
      ref(root)]), url: location.pathname + location.search, csrf: csrf()}));
    bags.forEach(bag => bag.sent && socket.send(bag.sent)); // resent with the same id
  };
  socket.onclose = () => {
    document.documentElement.classList.add("asok-disconnected");
    setTimeout(connect, retry * (1 + Math.random()) / 2);
    // the first socket never opened: a server that cannot carry it (WSGI, uvicorn without websockets)
    retry == 99 && console.error("asok: no live socket (WSGI? no websockets?)");
    retry = Math.min(retry * 2, 5000); // ms
  };
}

// directives: ws-click="add(5)" calls add(5); an input's value or a form's fields come last
function handle(event) {
  const {type, target} = event, value = target[target.type == "checkbox" ? "checked" : "value"];
  const name = type == "keydown" ? "ws-keydown." + event.key?.toLowerCase() : "ws-" + type;
  const model = type == "input" && target.getAttribute("ws-model"), el = model ? target : target.closest(`[${CSS.escape(name)}]`);
  const root = el?.closest(COMPONENT);
  if (!root) return;
  if (model) return enqueue(root.id, ["$model", [model, value]], target);
  event.preventDefault();
  const [, method, list] = el.getAttribute(name).match(/([^(]*)\(?(.*?)\)?$/); // "add(5)" or "add"
  enqueue(root.id, [method, [...JSON.parse(`[${list}]`), ...type == "submit" ? [Object.fromEntries(new FormData(el))] :
    type == "input" || type == "change" ? [value] : []]], type == "input" && el);
}

for (const type of ["click", "input", "change", "submit", "keydown"]) document.addEventListener(type, handle);
connect();
})();

//# part: model
// Served only to pages with a ws-model field (their replies and pushes carry the state's values,
// `s` in the token): after each reply or push, a field takes the value the server's state holds,
// unless it is focused and shows something else than what it sent last.
(() => {
const sync = self.asokSync = (root, sent = {}) => {
  const token = root.dataset.asokState, values = JSON.parse(token.slice(0, token.lastIndexOf("."))).s || {};
  for (const el of root.querySelectorAll("[ws-model]")) {
    const prop = el.getAttribute("ws-model"), key = el.type == "checkbox" ? "checked" : "value";
    if (prop in values && el[key] != values[prop] && (el != document.activeElement || el[key] == sent[prop])) el[key] = values[prop];
  }
};
document.querySelectorAll("[data-asok-component]").forEach(root => sync(root));
})();

//# part: hooks
// ws-hook="Name": window.asokHooks.Name.mounted/updated/destroyed(el), after each morph
(() => {
let hooked = [];
const hooks = window.asokMorphed = root => {
  const now = [...document.querySelectorAll("[ws-hook]")];
  for (const el of new Set([...hooked, ...now])) window.asokHooks?.[el.getAttribute("ws-hook")]?.[
    !now.includes(el) ? "destroyed" : !hooked.includes(el) ? "mounted" : root.contains(el) && "updated"]?.(el);
  hooked = now;
};
hooks(document);
})();

//# part: forms
// Served as /asok/alive-forms.js, only to pages with a component that renders a file input or
// binds state to the URL (`url = (...)`): uploads for ws-submit forms, and URL-bound fields.
(() => {
const COMPONENT = "[data-asok-component]", ids = new WeakMap; // File -> its upload id
const input = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value");
const state = root => JSON.parse(root.dataset.asokState.slice(0, root.dataset.asokState.lastIndexOf("."))).s;

// Uploads. A ws-submit form with chosen files first posts them to /asok/upload (with the
// component's signed state and the CSRF token), showing progress on the component as the class
// asok-uploading, the attribute data-asok-upload and the CSS variable --asok-upload (0-100, "%");
// then it is submitted as usual, each File going into the fields as {$upload: id} (no file: null).
File.prototype.toJSON = function () {
  return ids.has(this) ? {$upload: ids.get(this)} : null;
};

// A file input keeps its selection when a re-render sets its value to "", until it is uploaded.
document.addEventListener("change", ({target: el}) => {
  if (el.type != "file") return;
  el.setCustomValidity("");
  if (!Object.hasOwn(el, "value")) Object.defineProperty(el, "value", {
    get: () => input.get.call(el), set: v => (v || !el.files.length) && input.set.call(el, v)});
}, true);

document.addEventListener("submit", event => {
  const form = event.target, root = form.closest(COMPONENT), data = new FormData, xhr = new XMLHttpRequest;
  const inputs = [...form.querySelectorAll("input[type=file]")].filter(el => el.name && [...el.files].some(f => !ids.has(f)));
  if (!root || !form.matches("[ws-submit]") || !inputs.length) return;
  event.preventDefault();
  event.stopImmediatePropagation();
  if (root.classList.contains("asok-uploading")) return;
  const show = pct => root.style.setProperty("--asok-upload", (root.dataset.asokUpload = pct) + "%");
  const fields = {cid: root.id, component: root.dataset.asokComponent, state: root.dataset.asokState,
    csrf_token: document.querySelector("meta[name=csrf-token]")?.content};
  for (const name in fields) data.append(name, fields[name]);
  for (const el of inputs) for (const file of el.files) data.append(el.name, file);
  root.classList.add("asok-uploading");
  show(0);
  xhr.upload.onprogress = e => e.lengthComputable && show(Math.floor(e.loaded * 100 / e.total));
  xhr.onloadend = () => {
    let reply;
    root.classList.remove("asok-uploading");
    try {
      reply = JSON.parse(xhr.responseText);
    } catch {
      reply = {error: {code: "upload_failed", message: `the upload failed (${xhr.status || "no connection"})`}};
    }
    if (reply.error) {
      // the refusal shows at the file inputs (their validation message) and as asok:error
      for (const el of inputs) el.setCustomValidity(reply.error.message), el.reportValidity();
      return root.dispatchEvent(new CustomEvent("asok:error", {bubbles: true, detail: reply.error}));
    }
    show(100);
    for (const el of inputs) [...el.files].forEach((file, i) => ids.set(file, reply.files[el.name][i]));
    form.dispatchEvent(new Event("submit", {bubbles: true, cancelable: true}));
    for (const el of inputs) input.set.call(el, ""); // uploaded and sent: the selection is done
  };
  xhr.open("POST", "/asok/upload");
  xhr.send(data);
}, true);

// URL-bound fields (data-asok-url holds their defaults). After each new state the query string
// shows the fields that differ from their defaults (a new history entry); back and forward set
// the fields from the query string, one ws-model change each; a page loaded with a query string
// started from it on the server.
const restoring = new WeakMap; // root -> {field: value} that a back or forward is setting
function reflect(root, push) {
  const defaults = JSON.parse(root.dataset.asokUrl), values = state(root), query = new URLSearchParams(location.search);
  const want = restoring.get(root);
  if (want && Object.keys(want).some(k => String(values[k]) != want[k])) return;
  restoring.delete(root);
  for (const k in defaults) values[k] === defaults[k] ? query.delete(k) : query.set(k, values[k]);
  const url = location.pathname + (`${query}` ? "?" + query : "") + location.hash;
  if (url != location.pathname + location.search + location.hash) history[push ? "pushState" : "replaceState"](history.state, "", url);
}

new MutationObserver(changes => changes.forEach(({target}) => target.dataset.asokUrl && reflect(target, true)))
  .observe(document.documentElement, {subtree: true, attributeFilter: ["data-asok-state"]});
document.addEventListener("asok:error", ({target}) => restoring.delete(target));
addEventListener("popstate", () => document.querySelectorAll("[data-asok-url]").forEach(root => {
  const defaults = JSON.parse(root.dataset.asokUrl), values = state(root), query = new URLSearchParams(location.search), want = {};
  for (const k in defaults) {
    const value = query.has(k) ? query.get(k) : String(defaults[k]);
    if (String(values[k]) != value) want[k] = value;
  }
  restoring.set(root, want);
  // each field is set as a ws-model input would set it
  for (const k in want) {
    const el = Object.assign(root.appendChild(document.createElement("input")), {hidden: true, value: want[k]});
    el.setAttribute("ws-model", k);
    el.dispatchEvent(new Event("input", {bubbles: true}));
    el.remove();
  }
}));
document.querySelectorAll("[data-asok-url]").forEach(root => reflect(root, false));
})();
