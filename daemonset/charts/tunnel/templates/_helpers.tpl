{{/* The labels every object of the mesh's charts carries. Call with (dict "root" $ "app" NAME). */}}
{{- define "tunnel.labels" -}}
app: {{ .app }}
app.kubernetes.io/name: {{ .app }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Values.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The mesh image, <hub>/<image>:<tag>; the tag defaults to the chart's appVersion. */}}
{{- define "tunnel.image" -}}
{{- $tag := .Values.tag | default .Chart.AppVersion -}}
{{- if .Values.hub -}}
{{ printf "%s/%s:%s" .Values.hub .Values.image $tag }}
{{- else -}}
{{ printf "%s:%s" .Values.image $tag }}
{{- end -}}
{{- end }}

{{/* DaemonSet surge (a node's new tunnel starts before the old one stops: no connection
     fails in an upgrade) where the API server has it, Kubernetes >= 1.22; else one node's
     tunnel at a time. */}}
{{- define "tunnel.surge" -}}
{{- semverCompare ">=1.22-0" .Capabilities.KubeVersion.Version -}}
{{- end }}
