#!/usr/bin/env node
// Validate Grafana dashboard JSON files against the types in @grafana/schema.
//
//   node validate-dashboard.mjs DASHBOARD.json [...]     exit 0 when all are valid
//   node validate-dashboard.mjs --emit-schema DIR        also write the JSON Schemas
//
// Checks, for each file:
//   * the whole document against the Dashboard kind (closed objects: unknown keys fail);
//   * each panel's `options` and `fieldConfig.defaults.custom` against the panel
//     plugin's own types (timeseries, stat); any other panel type is an error until
//     its types are added to schema-types.ts;
//   * each query target against PrometheusTarget (DataQuery plus expr, legendFormat...).
// Semantic checks (ids, layout, variables, PromQL) live in tests/ops/test_ops_assets.py.

import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createGenerator } from 'ts-json-schema-generator';
import { Ajv } from 'ajv';

const here = dirname(fileURLToPath(import.meta.url));

const TYPES = ['FleetDashboard', 'TimeSeriesOptions', 'TimeSeriesFieldConfig', 'StatOptions', 'PrometheusTarget'];

// Which schema checks which part of a panel, by panel type. `custom: null` means
// the plugin has no custom field config, so none may be set.
const PANELS = {
  timeseries: { options: 'TimeSeriesOptions', custom: 'TimeSeriesFieldConfig' },
  stat: { options: 'StatOptions', custom: null },
};

function buildSchemas() {
  const generator = createGenerator({
    path: join(here, 'schema-types.ts'),
    tsconfig: join(here, 'tsconfig.json'),
    expose: 'none', // inline everything: @grafana/schema has two types named DataSourceRef
    topRef: false,
    additionalProperties: false,
    skipTypeCheck: false,
  });
  return Object.fromEntries(TYPES.map((type) => [type, generator.createSchema(type)]));
}

function main(argv) {
  const files = [];
  let emitDir = null;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--emit-schema') emitDir = argv[++i];
    else files.push(argv[i]);
  }
  if (files.length === 0 && emitDir === null) {
    console.error('usage: node validate-dashboard.mjs [--emit-schema DIR] DASHBOARD.json [...]');
    return 2;
  }

  const schemas = buildSchemas();
  if (emitDir !== null) {
    mkdirSync(emitDir, { recursive: true });
    for (const [type, schema] of Object.entries(schemas)) {
      writeFileSync(join(emitDir, `${type}.schema.json`), JSON.stringify(schema, null, 2) + '\n');
    }
  }

  const ajv = new Ajv({ allErrors: true, strict: false });
  const validators = Object.fromEntries(
    Object.entries(schemas).map(([type, schema]) => [type, ajv.compile(schema)]),
  );

  let failures = 0;
  for (const file of files) {
    const errors = validateFile(file, validators);
    if (errors.length === 0) {
      console.log(`ok: ${file}`);
    } else {
      failures++;
      console.log(`INVALID: ${file}`);
      for (const error of errors) console.log(`  ${error}`);
    }
  }
  return failures === 0 ? 0 : 1;
}

function check(validate, value, where, errors) {
  if (!validate(value)) {
    for (const e of validate.errors) {
      const extra = e.params && e.params.additionalProperty ? ` (${e.params.additionalProperty})` : '';
      errors.push(`${where}${e.instancePath} ${e.message}${extra}`);
    }
  }
}

function validateFile(file, v) {
  let dashboard;
  try {
    dashboard = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    return [`cannot read JSON: ${err.message}`];
  }
  const errors = [];
  check(v.FleetDashboard, dashboard, '$', errors);

  const panels = [];
  (dashboard.panels ?? []).forEach((panel, i) => {
    if (panel.type === 'row') {
      (panel.panels ?? []).forEach((inner, j) => panels.push([`$/panels/${i}/panels/${j}`, inner]));
    } else {
      panels.push([`$/panels/${i}`, panel]);
    }
  });

  for (const [where, panel] of panels) {
    const kind = PANELS[panel.type];
    if (kind === undefined) {
      errors.push(`${where} panel type "${panel.type}" has no schema here (add it to schema-types.ts)`);
      continue;
    }
    check(v[kind.options], panel.options ?? {}, `${where}/options`, errors);
    const custom = panel.fieldConfig?.defaults?.custom;
    if (kind.custom !== null) {
      check(v[kind.custom], custom ?? {}, `${where}/fieldConfig/defaults/custom`, errors);
    } else if (custom !== undefined && Object.keys(custom).length > 0) {
      errors.push(`${where}/fieldConfig/defaults/custom must be empty for a ${panel.type} panel`);
    }
    (panel.targets ?? []).forEach((target, k) => {
      check(v.PrometheusTarget, target, `${where}/targets/${k}`, errors);
    });
  }
  return errors;
}

process.exitCode = main(process.argv.slice(2));
