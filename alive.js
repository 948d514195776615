// alive.js: the asok browser runtime.
(() => {
const COMPONENT = "[data-asok-component]", DEBOUNCE_MS = 150, RETRY_MAX_MS = 5000;
const page = Math.random() + ":", queue = []; // [root, method, args]
let socket, retry = 100, counter = 0, sent, typing, timer;

// debounced input waits at the tail
function enqueue(el, [method, args], input) {
  clearTimeout(timer);
  if (input && input == typing) queue.pop();
  queue.push([el.closest(COMPONENT), method, args]);
  typing = input;
  if (input) timer = setTimeout(() => pump(typing = 0), DEBOUNCE_MS);
  pump();
}

function pump() {
  if (sent || queue.length <= !!typing || socket.readyState != 1) return;
  const [root, method, args] = queue.shift(), id = page + ++counter, data = root.dataset;
  sent = {root, id, text: JSON.stringify({id, cid: root.id, component: data.asokComponent, state: data.asokState,
    method, args, csrf: document.querySelector("meta[name=csrf-token]")?.content})};
  root.classList.add("asok-loading");
  socket.send(sent.text);
}

function receive(message) {
  const reply = JSON.parse(message.data), error = reply.error, {root, id} = sent || {};
  if (reply.id != id) return;
  sent = null;
  root.classList.remove("asok-loading");
  if (error) {
    root.dispatchEvent(new CustomEvent("asok:error", {bubbles: true, detail: error}));
    console.error("asok:", error.code, error.message);
  } else {
    morph(root, Object.assign(document.createElement("template"), {innerHTML: reply.html}).content);
    root.dataset.asokState = reply.state;
    syncModels(root);
  }
  pump();
}

function syncModels(root) {
  const state = root.dataset.asokState, values = JSON.parse(state.slice(0, state.lastIndexOf("."))).s;
  for (const el of root.querySelectorAll("[ws-model]")) {
    const prop = el.getAttribute("ws-model");
    if (el != document.activeElement && prop in values) el[el.type == "checkbox" ? "checked" : "value"] = values[prop];
  }
}

function morph(old, fresh) {
  let cursor = old.firstChild; // the first old child not yet placed
  for (const next of [...fresh.childNodes]) {
    // match by id, else the cursor if of the same kind
    let match = next.id && [...old.children].find(child => child.id == next.id);
    if (!match && cursor?.nodeName == next.nodeName && !cursor.id) match = cursor;
    // none: insert
    if (!match) {
      old.insertBefore(next, cursor);
      continue;
    }
    // the cursor: keep; elsewhere: move here, keeping focus
    if (match == cursor) cursor = cursor.nextSibling;
    else old[old.moveBefore ? "moveBefore" : "insertBefore"](match, cursor);
    // text, comment
    if (match.nodeType != 1) {
      match.nodeValue = next.nodeValue;
      continue;
    }
    // attributes: set, then remove missing; then children
    for (const {name, value} of next.attributes) if (match.getAttribute(name) != value) match.setAttribute(name, value);
    for (const {name} of [...match.attributes]) if (!next.hasAttribute(name)) match.removeAttribute(name);
    morph(match, next);
    // form values, except the focused element's
    for (const prop of ["value", "checked"]) if (prop in match && match != document.activeElement && match[prop] != next[prop]) match[prop] = next[prop];
  }
  // leftovers: remove
  while (cursor?.nextSibling) cursor.nextSibling.remove();
  cursor?.remove();
}

function connect() {
  socket = new WebSocket(location.origin.replace("http", "ws") + "/asok/live");
  socket.onmessage = receive;
  socket.onopen = () => {
    retry = 100;
    document.documentElement.classList.remove("asok-disconnected");
    sent ? socket.send(sent.text) : pump();
  };
  socket.onclose = () => {
    document.documentElement.classList.add("asok-disconnected");
    setTimeout(connect, retry * (1 + Math.random()) / 2);
    retry = Math.min(retry * 2, RETRY_MAX_MS);
  };
}

function handle(event) {
  const {type, target} = event, value = target[target.type == "checkbox" ? "checked" : "value"], model = target.getAttribute("ws-model");
  const name = type == "keydown" ? "ws-keydown." + event.key?.toLowerCase() : "ws-" + type;
  const el = target.closest(`[${CSS.escape(name)}]`);
  if (type == "input" && model) return enqueue(target, ["$model", [model, value]], target);
  if (!el?.closest(COMPONENT)) return;
  event.preventDefault();
  const fallback = type == "submit" ? [Object.fromEntries(new FormData(el))] : type == "click" || type == "keydown" ? [] : [value];
  const call = el.getAttribute(name), open = call.indexOf("("); // "add(5)" or "add"
  enqueue(el, open < 0 ? [call, fallback] : [call.slice(0, open), JSON.parse(`[${call.slice(open + 1, -1)}]`)], type == "input" && el);
}

for (const type of ["click", "input", "change", "submit", "keydown"]) document.addEventListener(type, handle);
connect();
document.querySelectorAll(COMPONENT).forEach(syncModels);
})();
