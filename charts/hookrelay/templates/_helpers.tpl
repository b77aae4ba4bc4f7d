{{- define "hookrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hookrelay.fullname" -}}
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

{{- define "hookrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hookrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hookrelay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "hookrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "hookrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hookrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hookrelay.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "hookrelay.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{/*
What the operator does in each namespace it watches: the same rules for the ClusterRole
(cluster-wide) and for the Role in each listed namespace.
*/}}
{{- define "hookrelay.namespacedRules" -}}
# The REST API acts on Webhooks for authorised callers; the controller watches them.
- apiGroups: [hookrelay.dev]
  resources: [webhooks]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [hookrelay.dev]
  resources: [webhooks/status, documentevents/status]
  verbs: [get, patch]
# Ingest creates DocumentEvents; retention deletes them.
- apiGroups: [hookrelay.dev]
  resources: [documentevents]
  verbs: [get, list, watch, create, delete]
# Signing Secrets (watched with a label selector); the REST API creates, rotates (patch) and
# deletes the ones it generates; the leader removes a rotated-out key after its grace period.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
# Services named by a Webhook's serviceRef (read only: their ClusterIP and ports).
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch]
# Condition changes as Events (kube-runtime's Recorder writes events.k8s.io/v1 only).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
