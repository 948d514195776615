// alive.js: the asok browser runtime.
(() => {
const COMPONENT = "[data-asok-component]", DEBOUNCE_MS = 150, RETRY_MAX_MS = 5000;
const page = Math.random() + ":", bags = new Map; // root -> {queue, field, timer, sent, id, models}
let socket, retry = 100, counter = 0;

// one FIFO queue per component; a debounced input waits at its tail
function enqueue(root, call, field) {
  const bag = bags.get(root) || bags.set(root, {queue: [], models: {}}).get(root);
  clearTimeout(bag.timer);
  if (field && field == bag.field) bag.queue.pop();
  if (call) bag.queue.push(call);
  if (bag.field = field) bag.timer = setTimeout(() => enqueue(root), DEBOUNCE_MS);
  send(root, bag);
}

// one event in flight per component
function send(root, bag) {
  if (!bag.sent && bag.queue.length > !!bag.field) {
    const [method, args] = bag.queue.shift(), id = bag.id = page + ++counter, data = root.dataset;
    if (method == "$model") bag.models[args[0]] = args[1];
    bag.sent = JSON.stringify({id, cid: root.id, component: data.asokComponent, state: data.asokState,
      method, args, csrf: document.querySelector("meta[name=csrf-token]")?.content});
    socket.readyState == 1 && socket.send(bag.sent);
  }
  root.classList.toggle("asok-loading", !!bag.sent);
}

function receive(message) {
  const {id, html, state, error} = JSON.parse(message.data);
  for (const [root, bag] of bags) if (bag.sent && bag.id == id) {
    bag.sent = null;
    if (error) root.dispatchEvent(new CustomEvent("asok:error", {bubbles: true, detail: error}));
    else {
      morph(root, Object.assign(document.createElement("template"), {innerHTML: html}).content);
      sync(root, bag.models, root.dataset.asokState = state);
    }
    send(root, bag);
  }
}

// ws-model: a focused field takes a value the server changed, if it shows what it sent last
function sync(root, sent, state) {
  const values = JSON.parse(state.slice(0, state.lastIndexOf("."))).s;
  for (const el of root.querySelectorAll("[ws-model]")) {
    const prop = el.getAttribute("ws-model"), key = el.type == "checkbox" ? "checked" : "value";
    if (prop in values && el[key] != values[prop] && (el != document.activeElement || el[key] == sent[prop])) el[key] = values[prop];
  }
}

// morph: update each old node in place if the new one is of the same kind, else insert
function morph(old, fresh) {
  let cursor = old.firstChild;
  for (const next of [...fresh.childNodes]) {
    const match = cursor;
    if (match?.nodeName != next.nodeName) {
      old.insertBefore(next, match);
      continue;
    }
    cursor = match.nextSibling;
    // text, comment
    if (match.nodeType != 1) {
      match.nodeValue = next.nodeValue;
      continue;
    }
    // attributes, children, form values (the focused one's is the user's)
    for (const {name, value} of next.attributes) match.setAttribute(name, value);
    for (const {name} of [...match.attributes]) if (!next.hasAttribute(name)) match.removeAttribute(name);
    morph(match, next);
    for (const prop of ["value", "checked"]) if (match != document.activeElement && match[prop] != next[prop]) match[prop] = next[prop];
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
    bags.forEach(bag => bag.sent && socket.send(bag.sent)); // resent with the same id
  };
  socket.onclose = () => {
    document.documentElement.classList.add("asok-disconnected");
    setTimeout(connect, retry * (1 + Math.random()) / 2);
    retry = Math.min(retry * 2, RETRY_MAX_MS);
  };
}

function handle(event) {
  const {type, target} = event, root = target.closest(COMPONENT), value = target[target.type == "checkbox" ? "checked" : "value"];
  const name = type == "keydown" ? "ws-keydown." + event.key?.toLowerCase() : "ws-" + type, el = target.closest(`[${CSS.escape(name)}]`);
  const model = type == "input" && target.getAttribute("ws-model");
  if (!root || !model && !el) return;
  if (model) return enqueue(root, ["$model", [model, value]], target);
  event.preventDefault();
  const [, method, list] = el.getAttribute(name).match(/([^(]*)\(?(.*?)\)?$/); // "add(5)" or "add"
  enqueue(root, [method, list ? JSON.parse(`[${list}]`) : type == "submit" ? [Object.fromEntries(new FormData(el))] : type == "input" || type == "change" ? [value] : []], type == "input" && el);
}

for (const type of ["click", "input", "change", "submit", "keydown"]) document.addEventListener(type, handle);
connect();
document.querySelectorAll(COMPONENT).forEach(root => sync(root, {}, root.dataset.asokState));
})();
