{{/* Name of the chart, overridable. */}}
{{- define "usernsguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every namespaced and cluster-scoped object name: the release name, or
"<release>-usernsguard" when the release name does not contain the chart name. With
`helm install usernsguard ...` it is "usernsguard", so the agent's ServiceAccount is
"usernsguard-agent". Kept short enough for the "-controller" suffix within 63 characters.
*/}}
{{- define "usernsguard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "usernsguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "usernsguard.labels" -}}
helm.sh/chart: {{ include "usernsguard.chart" . }}
app.kubernetes.io/name: {{ include "usernsguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: usernsguard
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "agent"). */}}
{{- define "usernsguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "usernsguard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The `job` label Prometheus gives the component's targets (ServiceMonitor/PodMonitor
`jobLabel` reads it from this label), independent of the release name, because
files/alerts.yaml is a plain rule file that names the job: usernsguard-agent.
*/}}
{{- define "usernsguard.jobLabelKey" -}}usernsguard.io/job{{- end }}

{{/* Labels of a component's objects: common (name, instance, ...) + component + job. */}}
{{- define "usernsguard.componentLabels" -}}
{{ include "usernsguard.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{ include "usernsguard.jobLabelKey" . }}: usernsguard-{{ .component }}
{{- end }}

{{- define "usernsguard.agentName" -}}{{ include "usernsguard.fullname" . }}-agent{{- end }}
{{- define "usernsguard.controllerName" -}}{{ include "usernsguard.fullname" . }}-controller{{- end }}

{{/*
The image of agent, controller and uninstall hook, and the image the agent names in
--probe-image (the cri-pod check runs a sandbox from an image already on the node: this
one, since the DaemonSet pulled it). A digest, when set, wins over the tag.
*/}}
{{- define "usernsguard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The agent ServiceAccount's user name, as the API server authenticates it. */}}
{{- define "usernsguard.agentUsername" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "usernsguard.agentName" . }}
{{- end }}

{{/*
Seconds in a Go duration made of h/m/s parts ("6h", "1h30m", "90s"), the form the SelfTest
CRD accepts for spec.interval. Empty in, empty out.
*/}}
{{- define "usernsguard.durationSeconds" -}}
{{- if . }}
{{- if not (regexMatch "^([0-9]+(s|m|h))+$" .) }}
{{- fail (printf "duration %q: expected h/m/s parts such as 6h or 1h30m" .) }}
{{- end }}
{{- $total := 0 }}
{{- range $part := regexFindAll "[0-9]+[hms]" . -1 }}
{{- $n := trimSuffix "h" (trimSuffix "m" (trimSuffix "s" $part)) | atoi }}
{{- $unit := 1 }}
{{- if hasSuffix "h" $part }}{{ $unit = 3600 }}{{ else if hasSuffix "m" $part }}{{ $unit = 60 }}{{ end }}
{{- $total = add $total (mul $n $unit) }}
{{- end }}
{{- $total }}
{{- end }}
{{- end }}

{{/*
How a custom resource from values is created. Helm builds every object of the release
before it creates any, so an object whose kind comes from a CRD of this same release cannot
be an ordinary release object on the FIRST install (the API server does not serve the kind
yet). Then it is a post-install hook, carrying Helm's ownership label and annotations so
that the next `helm upgrade`, which renders it as an ordinary object (the API serves the
kind by then), adopts it and from then on patches it in place: a RuntimeProfile is never
deleted and recreated by an upgrade (a deleted profile uninstalls its runtime everywhere).
Argument: (dict "ctx" $ "kind" "SelfTest").
*/}}
{{- define "usernsguard.crMetadata" -}}
{{- if not (.ctx.Capabilities.APIVersions.Has (printf "usernsguard.io/v1alpha1/%s" .kind)) }}
annotations:
  helm.sh/hook: post-install
  helm.sh/hook-weight: "0"
  helm.sh/hook-delete-policy: before-hook-creation
  meta.helm.sh/release-name: {{ .ctx.Release.Name }}
  meta.helm.sh/release-namespace: {{ .ctx.Release.Namespace }}
{{- end }}
labels:
  {{- include "usernsguard.labels" .ctx | nindent 2 }}
{{- end }}
