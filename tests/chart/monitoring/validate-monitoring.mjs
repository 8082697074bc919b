// Validates monitoring.coreos.com/v1 ServiceMonitor, PodMonitor and PrometheusRule objects
// in YAML files (`helm template` output) against the schemas @kubernetes-models/
// prometheus-operator compiles from the prometheus-operator CRDs (ajv). Catches wrong
// types, bad patterns (interval) and missing required fields; it does not reject unknown
// fields. Other kinds are ignored.
// Usage: node validate-monitoring.mjs EXPECTED_COUNT FILE...
//   exit 1 if an object is invalid or the files hold a different number of such objects.
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ServiceMonitor, PodMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const kinds = { ServiceMonitor, PodMonitor, PrometheusRule };
const expected = Number(process.argv[2]);
let bad = 0, seen = 0;
for (const file of process.argv.slice(3)) {
  for (const doc of yaml.loadAll(readFileSync(file, "utf8"))) {
    if (!doc || doc.apiVersion !== "monitoring.coreos.com/v1") continue;
    seen++;
    if (!kinds[doc.kind]) {
      bad++;
      console.log(`FAIL ${file}: ${doc.kind}/${doc.metadata?.name}: no schema for this kind here`);
      continue;
    }
    try {
      new kinds[doc.kind](doc).validate();
      console.log(`ok   ${file}: ${doc.kind}/${doc.metadata?.name}`);
    } catch (e) {
      bad++;
      console.log(`FAIL ${file}: ${doc.kind}/${doc.metadata?.name}: ${e.message}`);
    }
  }
}
if (seen !== expected) {
  bad++;
  console.log(`FAIL expected ${expected} monitoring.coreos.com objects, found ${seen}`);
}
console.log(`validate-monitoring: ${seen - bad < 0 ? 0 : seen - bad} passed, ${bad} failed`);
process.exit(bad ? 1 : 0);
