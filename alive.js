// alive.js: the asok browser runtime. asok serves it minified: lines that are only a comment,
// indentation and trailing " // " comments go (keep " // " out of strings), so comment freely.
// A line "//# part: name" starts a part served as a second script only to pages that need it.
(() => {
const COMPONENT = "[data-asok-component]", DEBOUNCE_MS = 150, RETRY_MAX_MS = 5000;
const page = Math.random() + ":", bags = new Map; // root -> {queue, field, timer, sent, id, models}
let socket, retry = 100, counter = 0;
// a state token is JSON {s: state, v: version, q: save number, t: issued} + "." + signature
const fields = token => JSON.parse(token.slice(0, token.lastIndexOf("."))), csrf = () => document.querySelector("meta[name=csrf-token]")?.content;

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
      method, args, csrf: csrf()});
    socket.readyState == 1 && socket.send(bag.sent);
  }
  root.classList.toggle("asok-loading", !!bag.sent);
}

// a reply {id, html, state} or {id, error}; a push {cid, html, state} or {cid, error}
function receive(message) {
  const {id, cid, html, state, error} = JSON.parse(message.data);
  let root = cid && document.getElementById(cid), bag;
  for (const [r, b] of bags) if (b.sent && b.id == id) root = r, bag = b;
  if (!root) return;
  if (bag) bag.sent = null;
  if (error) root.dispatchEvent(new CustomEvent("asok:error", {bubbles: true, detail: error}));
  // HTML older than what the component shows (a reply overtaken by a push) is dropped
  else if (fields(state).q >= fields(root.dataset.asokState).q) {
    morph(root, Object.assign(document.createElement("template"), {innerHTML: html}).content);
    sync(root, bag ? bag.models : {}, root.dataset.asokState = state);
  }
  bag && send(root, bag);
}

// ws-model: a focused field takes a value the server changed, if it shows what it sent last
function sync(root, sent, state) {
  const values = fields(state).s;
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
    // join: the components shown and their saves; the server sends newer HTML, then pushes
    socket.send(JSON.stringify({join: [...document.querySelectorAll(COMPONENT)].map(root => [root.id, root.dataset.asokComponent,
      root.dataset.asokState]), url: location.pathname + location.search, csrf: csrf()}));
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
