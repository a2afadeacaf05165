{{/* The chart's name, at most 63 characters (a DNS label). */}}
{{- define "agentk.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects' name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "agentk.fullname" -}}
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

{{- define "agentk.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentk.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agentk.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "agentk.selectorLabels" . }}
app.kubernetes.io/version: {{ include "agentk.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "agentk.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "agentk.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "agentk.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "agentk.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agentk.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name the existing service account when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the agent's token under the key "token". */}}
{{- define "agentk.tokenSecretName" -}}
{{- if .Values.config.secretName }}
{{- .Values.config.secretName }}
{{- else if .Values.config.token }}
{{- printf "%s-token" (include "agentk.fullname" .) }}
{{- else }}
{{- fail "config.token or config.secretName: agentk needs the agent's token (from the agent's page in GitLab)" }}
{{- end }}
{{- end }}

{{/* The PEM CA certificate for KAS: kasCaCert, else GitLab's older caCert. */}}
{{- define "agentk.kasCaCert" -}}
{{- default .Values.config.caCert .Values.config.kasCaCert }}
{{- end }}
