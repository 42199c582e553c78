#!/usr/bin/env node
// Validate Kubernetes manifests of Prometheus Operator kinds against the operator's CRD schemas.
//
//   node validate.mjs MANIFEST.yaml...      (npm run validate checks the committed manifests)
//
// Exit status: 0 when every document of every file validates, 1 when one does not (each error
// printed as `FILE: document N (KIND NAME): /json/path message`), 2 for bad usage, a file that
// cannot be read or is not YAML, or a document of a kind this script has no schema for.
//
// The schemas: @kubernetes-models/prometheus-operator ships validators compiled (ajv) from the
// OpenAPI schemas of the Prometheus Operator's CustomResourceDefinitions, the same schemas the
// API server checks a manifest against when it is applied: required fields (`expr` of a rule,
// `selector` of a PodMonitor), enums (`apiVersion`), and patterns (a duration such as `for` or
// `interval` must be Prometheus's `5m` form). Like the API server, they do not reject unknown
// fields (the API server prunes them silently), so a misspelt optional key is not an error
// here; tests/monitoring/test_kubernetes.py checks the keys the manifests use.
import { readFileSync } from "node:fs";
import { basename } from "node:path";

import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { parseAllDocuments } from "yaml";

const MODELS = { PodMonitor, PrometheusRule };
const API_VERSION = "monitoring.coreos.com/v1";

function main(argv) {
  if (argv.length === 0) {
    process.stderr.write("usage: node validate.mjs MANIFEST.yaml...\n");
    return 2;
  }
  let status = 0;
  for (const path of argv) {
    let documents;
    try {
      documents = parseAllDocuments(readFileSync(path, "utf8"));
    } catch (err) {
      process.stderr.write(`${path}: ${err.message}\n`);
      return 2;
    }
    if (!Array.isArray(documents)) documents = [documents]; // an empty stream
    const objects = [];
    for (const doc of documents) {
      if (doc.errors.length) {
        process.stderr.write(`${path}: not YAML: ${doc.errors[0].message}\n`);
        return 2;
      }
      const value = doc.toJS();
      if (value !== null) objects.push(value);
    }
    if (objects.length === 0) {
      process.stderr.write(`${path}: no Kubernetes object in the file\n`);
      return 2;
    }
    for (const [index, object] of objects.entries()) {
      const where = `${basename(path)}: document ${index + 1}`;
      if (typeof object !== "object" || Array.isArray(object)) {
        process.stderr.write(`${where}: not a mapping\n`);
        return 2;
      }
      const Model = Object.hasOwn(MODELS, object.kind) ? MODELS[object.kind] : undefined;
      if (Model === undefined || object.apiVersion !== API_VERSION) {
        process.stderr.write(
          `${where}: no schema for apiVersion ${JSON.stringify(object.apiVersion)} kind ` +
            `${JSON.stringify(object.kind)} (known: ${API_VERSION} ${Object.keys(MODELS).join(", ")})\n`,
        );
        return 2;
      }
      const name = object.metadata?.name ?? "(no name)";
      try {
        // The model's constructor fills apiVersion and kind only when they are missing; both
        // are present here, so what is validated is the document as written.
        new Model(object).validate();
        process.stdout.write(`${where} (${object.kind} ${name}): valid\n`);
      } catch (err) {
        status = 1;
        process.stdout.write(`${where} (${object.kind} ${name}): ${err.message}\n`);
      }
    }
  }
  return status;
}

process.exitCode = main(process.argv.slice(2));
