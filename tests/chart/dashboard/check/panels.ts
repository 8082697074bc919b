// The dashboard type with each panel's `options` and `fieldConfig.defaults.custom` typed by
// its panel `type` (from @grafana/schema's per-panel "panelcfg" types), and Prometheus
// targets typed by a small local interface (@grafana/schema has no Prometheus query type).
import type { Dashboard, Panel, RowPanel, FieldConfigSource, DataSourceRef } from '@grafana/schema';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as Gauge from '@grafana/schema/dist/esm/raw/composable/gauge/panelcfg/x/GaugePanelCfg_types.gen';
import type * as BarGauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as StateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as StatusHistory from '@grafana/schema/dist/esm/raw/composable/statushistory/panelcfg/x/StatusHistoryPanelCfg_types.gen';
import type * as Heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen';
import type * as Text from '@grafana/schema/dist/esm/raw/composable/text/panelcfg/x/TextPanelCfg_types.gen';
import type { Jsonish } from './jsonish.js';

type Options = {
  timeseries: TimeSeries.Options; stat: Stat.Options; table: Table.Options; gauge: Gauge.Options;
  bargauge: BarGauge.Options; 'state-timeline': StateTimeline.Options;
  'status-history': StatusHistory.Options; heatmap: Heatmap.Options; text: Text.Options;
};
type Custom = {
  timeseries: TimeSeries.FieldConfig; stat: {}; table: Table.FieldConfig; gauge: {}; bargauge: {};
  'state-timeline': StateTimeline.FieldConfig; 'status-history': StatusHistory.FieldConfig;
  heatmap: Heatmap.FieldConfig; text: {};
};
export interface PrometheusTarget {
  refId: string;
  expr: string;
  datasource?: DataSourceRef;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
  intervalFactor?: number;
  hide?: boolean;
  exemplar?: boolean;
  editorMode?: 'code' | 'builder';
}
type TypedPanel<K extends keyof Options> = Omit<Panel, 'type' | 'options' | 'fieldConfig' | 'targets'> & {
  type: K;
  options?: Options[K];
  fieldConfig?: FieldConfigSource<Custom[K]>;
  targets?: PrometheusTarget[];
};
export type AnyPanel = { [K in keyof Options]: TypedPanel<K> }[keyof Options];
export type Row = Omit<RowPanel, 'panels'> & { panels: AnyPanel[] };
export type CheckedDashboard = Jsonish<Omit<Dashboard, 'panels'> & { panels?: Array<AnyPanel | Row> }>;
