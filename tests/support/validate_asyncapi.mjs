// Validates AsyncAPI documents with the official parser (@asyncapi/parser).
// Usage: NODE_PATH=<dir with node_modules> node validate_asyncapi.mjs doc1.json [doc2.json ...]
// Prints one JSON line per document: {"file", "errors": [...], "warnings": n}; exit 1 if any has errors.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.ASYNCAPI_PARSER_DIR || process.cwd(), "noop.js"));
const { Parser } = require("@asyncapi/parser");
const parser = new Parser();
let failed = false;
for (const file of process.argv.slice(2)) {
  const { document, diagnostics } = await parser.parse(readFileSync(file, "utf8"));
  // Severity 0 is an error; 1 a warning, 2 information, 3 a hint.
  const errors = diagnostics.filter((d) => d.severity === 0)
    .map((d) => `${d.code}: ${d.message} at ${(d.path || []).join("/")}`);
  if (errors.length || !document) failed = true;
  console.log(JSON.stringify({ file, errors, warnings: diagnostics.filter((d) => d.severity === 1).length }));
}
process.exit(failed ? 1 : 0);
