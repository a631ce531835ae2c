{{- define "rerank.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rerank.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rerank.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rerank.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rerank.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rerank.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "rerank.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rerank.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: given, or shutdown grace + preStop sleep + 15 s. */}}
{{- define "rerank.terminationGrace" -}}
{{- $floor := add (int (ceil .Values.shutdownGrace)) (int .Values.preStopSleepSeconds) -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- if le (int .Values.terminationGracePeriodSeconds) $floor -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed shutdownGrace + preStopSleepSeconds (%v)" .Values.terminationGracePeriodSeconds $floor) -}}
{{- end -}}
{{- int .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add $floor 15 -}}
{{- end -}}
{{- end -}}

{{/* A probe: native grpc (plaintext), or `rerank-service health` over TLS. */}}
{{- define "rerank.probe" -}}
{{- $root := .root -}}
{{- if $root.Values.tls.enabled }}
exec:
  command:
    - rerank-service
    - health
    - --target=localhost:{{ $root.Values.grpcPort }}
    - --service={{ .service }}
    - --timeout={{ .cfg.timeoutSeconds }}
    - --tls-ca=/etc/rerank/tls/{{ if $root.Values.tls.clientCA }}ca.crt{{ else }}tls.crt{{ end }}
    {{- if $root.Values.tls.clientCA }}
    - --tls-cert=/etc/rerank/tls/tls.crt
    - --tls-key=/etc/rerank/tls/tls.key
    {{- end }}
{{- else }}
grpc:
  port: {{ $root.Values.grpcPort }}
  {{- if .service }}
  service: {{ .service }}
  {{- end }}
{{- end }}
periodSeconds: {{ .cfg.periodSeconds }}
failureThreshold: {{ .cfg.failureThreshold }}
timeoutSeconds: {{ .cfg.timeoutSeconds }}
{{- end -}}
