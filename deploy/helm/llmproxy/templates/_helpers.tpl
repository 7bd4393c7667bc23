{{/* Names and labels shared by every template. */}}
{{- define "llmproxy.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llmproxy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llmproxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "llmproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "llmproxy.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The gateway config: .Values.config with `server:` made from .Values.server. */}}
{{- define "llmproxy.config" -}}
{{- $server := dict "host" "0.0.0.0" "port" .Values.server.port "workers" 1 "max_body_bytes" .Values.server.maxBodyBytes "drain_delay" .Values.server.drainDelay "graceful_timeout" .Values.server.gracefulTimeout -}}
{{- toYaml (merge (dict "server" $server) (deepCopy .Values.config)) -}}
{{- end -}}

{{/* Refuse a grace period that would SIGKILL a replica still finishing its streams. */}}
{{- define "llmproxy.checkGrace" -}}
{{- $needed := add (mul 2 .Values.server.drainDelay) .Values.server.gracefulTimeout -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be above 2 x server.drainDelay + server.gracefulTimeout (%v): the preStop sleep, then the gateway's drain_delay and graceful_timeout" .Values.terminationGracePeriodSeconds $needed) -}}
{{- end -}}
{{- end -}}

{{/* The pod's environment: every key of the existing Secret. */}}
{{- define "llmproxy.envFrom" -}}
envFrom:
  - secretRef:
      name: {{ required "existingSecret: name a Secret holding LLMPROXY_MASTER_KEY, DATABASE_URL, REDIS_URL and the provider keys" .Values.existingSecret }}
{{- end -}}

{{- define "llmproxy.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: [ALL]
{{- end -}}
