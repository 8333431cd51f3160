// The offline API reference: renders /openapi.json as a list of operations, grouped by tag.
// Our own code; nothing is loaded from another host.
"use strict";
(function () {
  var METHODS = ["get", "post", "put", "patch", "delete"];

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function schemaName(schema) {
    if (!schema) { return ""; }
    if (schema.$ref) { return schema.$ref.split("/").pop(); }
    if (schema.type === "array") { return schemaName(schema.items) + "[]"; }
    return schema.type || "object";
  }

  function params(op) {
    var rows = (op.parameters || []).map(function (p) {
      return el("tr", {}, [el("td", {}, [el("code", {}, [p.name])]), el("td", {}, [p.in]),
        el("td", {}, [schemaName(p.schema)]), el("td", {}, [p.required ? "required" : ""]),
        el("td", {}, [p.description || ""])]);
    });
    if (!rows.length) { return null; }
    var head = el("tr", {}, ["Name", "In", "Type", "", "Description"].map(function (h) {
      return el("th", { scope: "col" }, [h]);
    }));
    return el("div", { "class": "scroll" }, [el("table", {}, [el("thead", {}, [head]),
      el("tbody", {}, rows)])]);
  }

  function responses(op) {
    var items = Object.keys(op.responses || {}).map(function (code) {
      var r = op.responses[code];
      var content = r.content && r.content["application/json"];
      var type = content ? " (" + schemaName(content.schema) + ")" : "";
      return el("li", {}, [el("code", {}, [code]), " " + (r.description || "") + type]);
    });
    return el("ul", {}, items);
  }

  function operation(path, method, op) {
    var body = op.requestBody && op.requestBody.content;
    var bodyText = body ? "Body: " + Object.keys(body).map(function (type) {
      return type + " " + schemaName(body[type].schema);
    }).join(", ") : null;
    var parts = [
      el("summary", {}, [el("span", { "class": "badge" }, [method.toUpperCase()]), " ",
        el("code", {}, [path]), " " + (op.summary || "")]),
    ];
    if (op.description) { parts.push(el("p", {}, [op.description])); }
    var table = params(op);
    if (table) { parts.push(table); }
    if (bodyText) { parts.push(el("p", {}, [bodyText])); }
    parts.push(responses(op));
    var text = [path, method, op.summary || "", (op.tags || []).join(" ")].join(" ").toLowerCase();
    return el("details", { "class": "op", "data-text": text }, parts);
  }

  function render(spec) {
    var groups = {};
    Object.keys(spec.paths || {}).forEach(function (path) {
      METHODS.forEach(function (method) {
        var op = spec.paths[path][method];
        if (!op) { return; }
        var tag = (op.tags && op.tags[0]) || "other";
        (groups[tag] = groups[tag] || []).push(operation(path, method, op));
      });
    });
    var root = document.getElementById("api");
    root.textContent = "";
    Object.keys(groups).sort().forEach(function (tag) {
      root.appendChild(el("section", { "class": "tag" }, [el("h2", {}, [tag])].concat(groups[tag])));
    });
  }

  function filter(text) {
    var needle = text.trim().toLowerCase();
    document.querySelectorAll("details.op").forEach(function (d) {
      d.hidden = needle !== "" && d.getAttribute("data-text").indexOf(needle) < 0;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    fetch("/openapi.json").then(function (r) { return r.json(); }).then(render)
      .catch(function (err) {
        document.getElementById("api").textContent = "The API description could not be loaded: " + err;
      });
    document.getElementById("api-filter").addEventListener("input", function (e) {
      filter(e.target.value);
    });
  });
})();
