// The shapes the dashboard validator checks, taken from @grafana/schema.
//
// validate-dashboard.mjs turns each exported type into a JSON Schema (with
// ts-json-schema-generator) and validates ops/grafana/*.json against it with ajv.
// Every object is closed (no unknown keys), so a typo such as "fieldconfig" or a
// field Grafana has renamed fails the check instead of being silently ignored.

import type { Dashboard, DataQuery } from '@grafana/schema';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

/** The dashboard kind (classic JSON model, schemaVersion 3x/4x). */
export type FleetDashboard = Dashboard;

/** `options` of a "timeseries" panel. */
export type TimeSeriesOptions = TimeSeries.Options;
/** `fieldConfig.defaults.custom` of a "timeseries" panel. */
export type TimeSeriesFieldConfig = TimeSeries.FieldConfig;
/** `options` of a "stat" panel (it has no custom field config). */
export type StatOptions = Stat.Options;

/**
 * A Prometheus query target. @grafana/schema leaves panel targets open
 * (Record<string, unknown>) and does not ship the Prometheus data source's query
 * type, so this is the subset of it that fleet's dashboards use, on top of the
 * common DataQuery (refId, datasource, hide, ...).
 */
export interface PrometheusTarget extends DataQuery {
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  editorMode?: 'code' | 'builder';
  interval?: string;
  exemplar?: boolean;
}
