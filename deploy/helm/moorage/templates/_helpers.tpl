{{/* Names: <release>-moorage (or the release name when it already says moorage), 63 characters at most. */}}
{{- define "moorage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moorage.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moorage.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "moorage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moorage
{{- end }}

{{/* selector labels of one component: include "moorage.selector" (list . "server") */}}
{{- define "moorage.selector" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "moorage.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "moorage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moorage.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moorage.secretName" -}}
{{- default (include "moorage.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "moorage.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.gpu.enabled }}{{ $tag = printf "%s%s" $tag .Values.gpu.imageTagSuffix }}{{ end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The drain arithmetic (README "Drain"): SIGTERM comes after the preStop sleep; the server keeps
serving drain_delay_s with /readyz 503, then gives in-flight work graceful_timeout_s; 5 s of margin. */}}
{{- define "moorage.server.gracePeriod" -}}
{{- $serve := .Values.settings.serve }}
{{- $pre := int .Values.server.preStopSleepSeconds }}
{{- $drain := int (ceil (default 0 $serve.drain_delay_s)) }}
{{- $graceful := int (ceil (default 30 $serve.graceful_timeout_s)) }}
{{- add $pre $drain $graceful 5 }}
{{- end }}

{{/* Startup probe: the pod has serve.load_budget_s to load its models, then one more period. */}}
{{- define "moorage.server.startupFailureThreshold" -}}
{{- $budget := default 300 .Values.settings.serve.load_budget_s }}
{{- $period := .Values.server.probes.periodSeconds }}
{{- add (int (ceil (divf $budget $period))) 1 }}
{{- end }}

{{- define "moorage.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* Environment shared by every moorage container: the settings file and the credentials. */}}
{{- define "moorage.env" -}}
- name: MOORAGE_CONFIG
  value: /etc/moorage/config.yaml
- name: MOORAGE_SECURITY__MASTER_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "moorage.secretName" . }}
      key: master-key
      optional: {{ not .Values.secret.required }}
- name: MOORAGE_REGISTRY__CATALOG_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "moorage.secretName" . }}
      key: database-url
      optional: {{ not .Values.secret.required }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moorage.volumeMounts" -}}
- name: config
  mountPath: /etc/moorage/config.yaml
  subPath: config.yaml
  readOnly: true
- name: home
  mountPath: {{ .Values.settings.home }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "moorage.volumes" -}}
- name: config
  configMap:
    name: {{ include "moorage.fullname" . }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.scratch.homeSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
{{- end }}

{{/* GPU pods: a memory-backed /dev/shm (the container runtime's default is 64 MiB; torch's
inter-process tensors and data-loader workers need more). */}}
{{- define "moorage.shmMount" -}}
{{- if .Values.gpu.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{- define "moorage.shmVolume" -}}
{{- if .Values.gpu.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.gpu.shmSizeLimit }}
{{- end }}
{{- end }}

{{/* topologySpreadConstraints of one component: include "moorage.topologySpread" (list . "server") */}}
{{- define "moorage.topologySpread" -}}
{{- $ctx := index . 0 -}}
{{- $component := index . 1 -}}
{{- if $ctx.Values.topologySpread.enabled -}}
topologySpreadConstraints:
{{- range $ctx.Values.topologySpread.topologyKeys }}
  - maxSkew: {{ $ctx.Values.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $ctx.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "moorage.selector" (list $ctx $component) | nindent 8 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pod-level fields every moorage pod shares. */}}
{{- define "moorage.podCommon" -}}
serviceAccountName: {{ include "moorage.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Several pods must share one catalog and one artifact store: a SQLite file and a folder in each
pod's emptyDir would give every replica models of its own, and a worker neither the server's models
nor its jobs. */}}
{{- define "moorage.checkShared" -}}
{{- $several := or (gt (int .Values.server.replicas) 1) .Values.autoscaling.enabled }}
{{- if or $several .Values.streamWorker.enabled .Values.jobsWorker.enabled }}
{{- $registry := default dict .Values.settings.registry }}
{{- if not (or .Values.secret.databaseUrl .Values.secret.existingSecret $registry.catalog_url) }}
{{- fail "several servers, and workers, share one catalog: set secret.databaseUrl (or secret.existingSecret) to a PostgreSQL URL" }}
{{- end }}
{{- if not $registry.store_url }}
{{- fail "several servers, and workers, share one artifact store: set settings.registry.store_url (e.g. s3://bucket)" }}
{{- end }}
{{- end }}
{{- end }}
